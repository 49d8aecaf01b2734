"""Flash Sparse Attention: KV-block-outer selected attention kernels (same contract as nsa_baseline)."""
