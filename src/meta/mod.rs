//! On-disk meta-data (placeholder: being written).
