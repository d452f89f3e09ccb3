//! A cluster node (being written).
