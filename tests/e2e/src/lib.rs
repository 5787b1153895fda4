//! Black-box HTTP tests live in `tests/`; this library is empty.
