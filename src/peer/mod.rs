//! Replication transport (placeholder: being written).
