//! What to watch: credentials, secrets and authentication endpoints, resolved to what the
//! kernel programs match on (inodes and addresses).
