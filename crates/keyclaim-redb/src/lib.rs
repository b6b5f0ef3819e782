//! The redb backend of keyclaim (work in progress).
