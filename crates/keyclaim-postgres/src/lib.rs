//! The postgres backend of keyclaim (work in progress).
