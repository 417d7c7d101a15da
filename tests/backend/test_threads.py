"""BLAS thread control (docs/performance.md#threads): each rank of a parallel launch gets its
share of the cores; ``--threads`` reaches the BLAS pool; bad counts are refused."""
import pytest

from lowrank.app import cli, cli_parser
from lowrank.backend import threads


def test_default_is_cores_over_local_ranks():
    assert threads.local_ranks({}) == 1
    assert threads.default_threads({}, cores=16) == 16
    assert threads.default_threads({"MPI_LOCALNRANKS": "2"}, cores=16) == 8
    assert threads.default_threads({"OMPI_COMM_WORLD_LOCAL_SIZE": "3"}, cores=16) == 5
    assert threads.default_threads({"PMI_SIZE": "4"}, cores=2) == 1   # never 0
    assert threads.local_ranks({"PMI_SIZE": "x"}) == 1


def test_launcher_default_leaves_a_users_choice_alone():
    assert threads.apply_default_under_launcher({}) is None
    assert threads.apply_default_under_launcher({"PMI_SIZE": "2", "OMP_NUM_THREADS": "3"}) is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad):
    with pytest.raises(ValueError, match="threads"):
        threads.set_threads(bad)


def test_set_threads_reaches_the_blas_pool():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = threadpoolctl.threadpool_info()
    if not any(i["user_api"] == "blas" for i in before):
        pytest.skip("no BLAS pool loaded")
    try:
        assert threads.set_threads(1)
        assert all(i["threads"] == 1 for i in threads.thread_info() if i["api"] == "blas")
    finally:
        threadpoolctl.threadpool_limits({i["prefix"]: i["num_threads"] for i in before})


def test_every_command_takes_threads(capsys):
    parser = cli_parser.build_parser()
    for command in ("pretrain", "finetune", "generate", "eval", "demo", "bench"):
        required = {"finetune": ["--base", "b", "--out", "o"], "pretrain": ["--out", "o"],
                    "generate": ["--model", "m"], "eval": ["--model", "m"]}.get(command, [])
        assert parser.parse_args([command, *required, "--threads", "3"]).threads == 3
    assert cli.main(["bench", "--threads", "0", "--steps", "1"]) == 2
    assert "--threads" in capsys.readouterr().err
