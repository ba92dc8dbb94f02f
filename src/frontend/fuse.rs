//! FUSE + loop frontend (placeholder: being written).
