"""Files that survive crashes and hostile input: atomic writes, safetensors, bounded JSON, schemas, where a model lives. Knows no model."""
