//! Replication frames (placeholder: being written).
