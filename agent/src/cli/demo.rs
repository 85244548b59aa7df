//! `ctoffload demo` (placeholder while it is written).
