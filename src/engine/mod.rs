//! Replicated volume engine (placeholder: being written).
