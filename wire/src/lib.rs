//! PostgreSQL protocol v3 codec, sans-IO: bytes in, frames out.
//!
//! The proxy reads into one `BytesMut` per connection and asks this crate to
//! split complete frames off it ([`Frame::decode`]) or just to look at the next
//! header ([`Header::peek`]) when it streams a large message through. Views over
//! message bodies borrow; encoders append to an output buffer. Nothing here does
//! IO, allocates per forwarded message, or panics on input.

pub mod backend;
mod error;
mod frame;
pub mod frontend;
mod read;
pub mod rows;
mod startup;

pub use error::{Error, Result};
pub use frame::{Frame, Header, HEADER_LEN};
pub use startup::{Startup, StartupRequest, STARTUP_BYTES_MAX};

#[cfg(test)]
mod fuzz {
    //! Decoding arbitrary bytes never panics.
    use super::*;
    use bytes::BytesMut;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = StartupRequest::decode(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(frame)) = Frame::decode(&mut buf, 256) {
                let body = frame.body();
                let _ = frontend::query_text(body);
                let _ = frontend::Parse::decode(body);
                let _ = frontend::Bind::decode(body);
                let _ = frontend::Target::decode(body);
                let _ = frontend::sasl_initial_response(body);
                let _ = frontend::password(body);
                let _ = backend::TransactionStatus::decode(body);
                let _ = backend::Authentication::decode(body);
                let _ = backend::ErrorFields::decode(body);
                let _ = backend::parameter_status(body);
                let _ = backend::backend_key_data(body);
                let _ = backend::command_tag(body);
            }
            // Every body is also fed directly, not just those that frame cleanly.
            let _ = frontend::Parse::decode(&bytes);
            let _ = frontend::Bind::decode(&bytes);
            let _ = backend::Authentication::decode(&bytes);
            let _ = backend::ErrorFields::decode(&bytes);
        }
    }
}
