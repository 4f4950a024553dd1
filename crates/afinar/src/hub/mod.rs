//! Reading checkpoints: safetensors (sharded + index), HF config.json, tokenizers, the hub, pinned assets.
