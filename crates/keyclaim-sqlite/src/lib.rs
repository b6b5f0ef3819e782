//! The sqlite backend of keyclaim (work in progress).
