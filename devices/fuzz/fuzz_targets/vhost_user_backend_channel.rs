//! The `vhost_user_backend_channel` fuzz target: its body, what it feeds and what it checks,
//! is [`devices::fuzzing::vhost_user_backend_channel`]
//! (`devices/src/virtio/net/vhost_user.rs`, module `fuzzing`), which the unit tests also run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::fuzzing::vhost_user_backend_channel(data));
