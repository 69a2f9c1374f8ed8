//! Harness for podsnap end-to-end tests (placeholder).
