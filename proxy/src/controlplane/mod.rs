//! skiff's embedded ADS control plane (`skiff control-plane`).
