//! Server side of PostgreSQL client authentication: SCRAM-SHA-256 and md5.
//!
//! The proxy plays PostgreSQL towards its clients, so it checks their
//! passwords itself before a session may borrow a server connection. This
//! module is sans-IO: it parses the secrets written in the config file and
//! turns the bodies of the client's SASL and password messages into the bodies
//! the proxy sends back. Framing (AuthenticationSASL, SASLInitialResponse,
//! AuthenticationMD5Password, ...) and choosing the method belong to the caller.
//!
//! The rules follow PostgreSQL's own server (`auth-scram.c`, `crypt.c`) and
//! the PostgreSQL docs, "SASL Authentication" (RFC 5802 and RFC 7677 as
//! PostgreSQL uses them): mechanism `SCRAM-SHA-256` only, no channel binding,
//! the user name in the client-first-message ignored (the startup packet's
//! `user` is the one that counts). Nothing here panics on client bytes, and
//! error texts never echo them.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use rand::RngCore as _;
use sha2::Sha256;

/// The one SASL mechanism the proxy offers in AuthenticationSASL (B).
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Random bytes in the server's nonce: PostgreSQL's `SCRAM_RAW_NONCE_LEN`.
const SERVER_NONCE_RAW_LEN: usize = 18;
/// Length of SHA-256 outputs, and so of StoredKey, ServerKey and the proof.
const SCRAM_KEY_LEN: usize = 32;
/// Base64 length of a 32-byte proof (with padding).
const SCRAM_KEY_B64_LEN: usize = 44;
/// Verifier prefix, as in `pg_authid.rolpassword`.
const SCRAM_VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";
/// Salt length of mock verifiers: PostgreSQL's `SCRAM_DEFAULT_SALT_LEN`.
const MOCK_SALT_LEN: usize = 16;
/// Iterations of mock verifiers: PostgreSQL's `SCRAM_SHA_256_DEFAULT_ITERATIONS`,
/// so that a mocked user looks like one made with the defaults.
const MOCK_ITERATIONS: u32 = 4096;
/// Prefix of md5-stored passwords and of md5 responses.
const MD5_PREFIX: &[u8] = b"md5";
/// Length of an md5 digest in hex.
const MD5_HEX_LEN: usize = 32;

/// Why an authentication exchange failed.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The client's proof does not match the stored secret, or the exchange
    /// was a mock for an unknown user.
    #[error("password authentication failed")]
    WrongPassword,
    /// A SASL message does not follow the SCRAM grammar as PostgreSQL accepts
    /// it, or asks for something the proxy does not support (channel binding,
    /// an authorization identity, a mandatory extension). The text is static
    /// and never contains client bytes.
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    /// A SASL message arrived when the exchange expected none: a second
    /// client-first, a client-final before the client-first, or anything
    /// after the exchange ended (successfully or not).
    #[error("unexpected SASL message at this point of the exchange")]
    OutOfOrder,
}

impl AuthError {
    /// The SQLSTATE PostgreSQL reports for this failure.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // invalid_password
            AuthError::WrongPassword => "28P01",
            // protocol_violation
            AuthError::Protocol(_) | AuthError::OutOfOrder => "08P01",
        }
    }
}

/// A configured user's secret as written in the config file.
///
/// The three forms are those of PostgreSQL's `pg_authid.rolpassword`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoredSecret {
    /// The password itself. Works for md5 and, once the caller has turned it
    /// into a verifier with [`ScramVerifier::from_password`], for SCRAM.
    Plain(String),
    /// `md5(password || user)` as 32 lowercase hex digits (without the `md5`
    /// prefix). Tied to the user name it was made with; works for md5 only.
    Md5([u8; MD5_HEX_LEN]),
    /// A SCRAM-SHA-256 verifier; works for SCRAM only.
    Scram(ScramVerifier),
}

impl StoredSecret {
    /// Reads a secret the way PostgreSQL's `get_password_type` does:
    /// `md5` followed by exactly 32 lowercase hex digits is md5,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64)
    /// is SCRAM, anything else, including a malformed SCRAM verifier, is a
    /// plaintext password.
    pub fn parse(s: &str) -> StoredSecret {
        if let Some(hex) = s.as_bytes().strip_prefix(MD5_PREFIX) {
            if let Ok(hex) = <[u8; MD5_HEX_LEN]>::try_from(hex) {
                if hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return StoredSecret::Md5(hex);
                }
            }
        }
        match ScramVerifier::parse(s) {
            Some(verifier) => StoredSecret::Scram(verifier),
            None => StoredSecret::Plain(s.to_owned()),
        }
    }
}

impl fmt::Debug for StoredSecret {
    // Secrets end up in logs through `{:?}`; only the kind is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredSecret::Plain(_) => f.write_str("Plain(<redacted>)"),
            StoredSecret::Md5(_) => f.write_str("Md5(<redacted>)"),
            StoredSecret::Scram(verifier) => f.debug_tuple("Scram").field(verifier).finish(),
        }
    }
}

/// A SCRAM-SHA-256 verifier: what the server keeps instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; SCRAM_KEY_LEN],
    server_key: [u8; SCRAM_KEY_LEN],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`,
    /// the fields in standard base64 with padding. `None` if the string is
    /// not such a verifier: iterations must be a positive decimal, the salt
    /// non-empty, both keys 32 bytes.
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix(SCRAM_VERIFIER_PREFIX)?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let iterations: u32 = iterations.parse().ok().filter(|&i| i > 0)?;
        let salt = STANDARD.decode(salt).ok().filter(|salt| !salt.is_empty())?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }

    /// Makes a verifier from a plaintext password with a fresh random salt
    /// and 4096 iterations, as PostgreSQL's `CREATE ROLE ... PASSWORD` does
    /// (SASLprep included). Costs one PBKDF2 run: call it once per user at
    /// config load, not per connection, so a user keeps one salt.
    pub fn from_password(password: &str) -> ScramVerifier {
        let encoded = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramVerifier::parse(&encoded)
            .expect("postgres-protocol writes verifiers in PostgreSQL's format")
    }

    /// A verifier for a user that does not exist, like PostgreSQL's
    /// `mock_scram_secret`: the salt is derived from the user name and a
    /// per-process secret `mock_nonce`, so repeated attempts see the same
    /// salt and cannot tell the user is missing. Use it with
    /// [`ScramServer::mock`], which never succeeds.
    fn mock(user: &str, mock_nonce: &[u8]) -> ScramVerifier {
        let digest = sha2::Sha256::new()
            .chain_update(user.as_bytes())
            .chain_update(mock_nonce)
            .finalize();
        ScramVerifier {
            iterations: MOCK_ITERATIONS,
            salt: digest.iter().take(MOCK_SALT_LEN).copied().collect(),
            // Never consulted: a mock exchange fails whatever the proof.
            stored_key: [0; SCRAM_KEY_LEN],
            server_key: [0; SCRAM_KEY_LEN],
        }
    }

    /// The verifier in the format [`ScramVerifier::parse`] reads.
    pub fn encode(&self) -> String {
        format!(
            "{SCRAM_VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key),
        )
    }

    /// PBKDF2 iteration count the client must run.
    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    /// The salt sent to the client.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

impl fmt::Debug for ScramVerifier {
    // The keys let anyone who reads them log in as the user (StoredKey plus a
    // sniffed exchange, or ServerKey to impersonate the server): never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

fn decode_key(b64: &str) -> Option<[u8; SCRAM_KEY_LEN]> {
    let bytes = STANDARD.decode(b64).ok()?;
    <[u8; SCRAM_KEY_LEN]>::try_from(bytes.as_slice()).ok()
}

/// The gs2 channel-binding flag of the client-first-message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CbindFlag {
    /// `n`: the client does not support channel binding.
    No,
    /// `y`: the client supports it but thinks the server does not. Fine
    /// while the proxy never offers SCRAM-SHA-256-PLUS; once it does, `y`
    /// means a downgrade and must be rejected, as PostgreSQL does over TLS.
    Yes,
}

impl CbindFlag {
    /// The `c=` value the client-final-message must carry: the base64 of the
    /// gs2 header (`n,,` or `y,,`, as no authzid is accepted).
    fn expected_c(self) -> &'static [u8] {
        match self {
            CbindFlag::No => b"biws",
            CbindFlag::Yes => b"eSws",
        }
    }
}

/// Server side of one SCRAM-SHA-256 exchange.
///
/// Feed it the client-first-message (the data of SASLInitialResponse (F))
/// with [`ScramServer::client_first`], send the returned bytes in
/// AuthenticationSASLContinue (B), feed the client-final-message (the data of
/// SASLResponse (F)) with [`ScramServer::client_final`], and on success send
/// the returned bytes in AuthenticationSASLFinal (B) followed by
/// AuthenticationOk (B). Checking that the mechanism named in
/// SASLInitialResponse is [`SCRAM_SHA_256`] is the caller's job. Any error
/// ends the exchange: later calls return [`AuthError::OutOfOrder`].
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    /// A mock exchange for an unknown user: runs like a real one, then fails.
    doomed: bool,
    state: ScramState,
}

enum ScramState {
    AwaitClientFirst,
    AwaitClientFinal(FirstExchange),
    Done,
}

/// What the client-final-message is checked against.
struct FirstExchange {
    cbind_flag: CbindFlag,
    /// Client nonce followed by server nonce, as in `r=` of both later messages.
    nonce: Vec<u8>,
    client_first_bare: Vec<u8>,
    server_first: Vec<u8>,
}

impl ScramServer {
    /// Starts an exchange for a user with this verifier, with a fresh server
    /// nonce of 18 random bytes in base64, as PostgreSQL makes it.
    pub fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer::build(verifier, random_server_nonce(), false)
    }

    /// Starts an exchange for a user that does not exist (PostgreSQL's
    /// "doomed" exchange): the client sees a plausible salt and iteration
    /// count, the same for every attempt with this `user`, and the exchange
    /// ends in [`AuthError::WrongPassword`] as if the password were wrong,
    /// so unknown users cannot be told from known ones. `mock_nonce` is a
    /// secret generated once per process (e.g. 32 random bytes at start).
    pub fn mock(user: &str, mock_nonce: &[u8]) -> ScramServer {
        ScramServer::build(
            ScramVerifier::mock(user, mock_nonce),
            random_server_nonce(),
            true,
        )
    }

    fn build(verifier: ScramVerifier, server_nonce: String, doomed: bool) -> ScramServer {
        ScramServer {
            verifier,
            server_nonce,
            doomed,
            state: ScramState::AwaitClientFirst,
        }
    }

    /// Takes the client-first-message and returns the server-first-message
    /// (`r=<client nonce><server nonce>,s=<salt>,i=<iterations>`).
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ScramState::AwaitClientFirst) {
            self.state = ScramState::Done;
            return Err(AuthError::OutOfOrder);
        }
        self.state = ScramState::Done;
        let first = parse_client_first(msg)?;

        let mut nonce = Vec::with_capacity(first.client_nonce.len() + self.server_nonce.len());
        nonce.extend_from_slice(first.client_nonce);
        nonce.extend_from_slice(self.server_nonce.as_bytes());

        let mut server_first = Vec::with_capacity(nonce.len() + 64);
        server_first.extend_from_slice(b"r=");
        server_first.extend_from_slice(&nonce);
        server_first.extend_from_slice(b",s=");
        server_first.extend_from_slice(STANDARD.encode(&self.verifier.salt).as_bytes());
        server_first.extend_from_slice(b",i=");
        server_first.extend_from_slice(self.verifier.iterations.to_string().as_bytes());

        self.state = ScramState::AwaitClientFinal(FirstExchange {
            cbind_flag: first.cbind_flag,
            nonce,
            client_first_bare: first.bare.to_vec(),
            server_first: server_first.clone(),
        });
        Ok(server_first)
    }

    /// Takes the client-final-message, checks its proof, and returns the
    /// server-final-message (`v=<ServerSignature>`) that lets the client
    /// check the proxy in turn. A wrong proof is [`AuthError::WrongPassword`].
    pub fn client_final(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        let first = match std::mem::replace(&mut self.state, ScramState::Done) {
            ScramState::AwaitClientFinal(first) => first,
            ScramState::AwaitClientFirst | ScramState::Done => return Err(AuthError::OutOfOrder),
        };
        let fin = parse_client_final(msg)?;
        if fin.channel_binding != first.cbind_flag.expected_c() {
            return Err(AuthError::Protocol(
                "unexpected channel-binding attribute in client-final-message",
            ));
        }
        if fin.nonce != first.nonce.as_slice() {
            return Err(AuthError::Protocol("nonce does not match"));
        }

        // AuthMessage = client-first-message-bare "," server-first-message ","
        //               client-final-message-without-proof   (RFC 5802, section 3)
        let auth_message: [&[u8]; 5] = [
            &first.client_first_bare,
            b",",
            &first.server_first,
            b",",
            fin.without_proof,
        ];
        let client_signature = hmac_sha256(&self.verifier.stored_key, &auth_message);
        let mut client_key = fin.proof;
        for (key, sig) in client_key.iter_mut().zip(client_signature) {
            *key ^= sig;
        }
        let stored_key: [u8; SCRAM_KEY_LEN] = Sha256::digest(client_key).into();
        let proof_ok = ct_eq(&stored_key, &self.verifier.stored_key);
        if self.doomed || !proof_ok {
            return Err(AuthError::WrongPassword);
        }

        let server_signature = hmac_sha256(&self.verifier.server_key, &auth_message);
        let mut server_final = b"v=".to_vec();
        server_final.extend_from_slice(STANDARD.encode(server_signature).as_bytes());
        Ok(server_final)
    }
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            ScramState::AwaitClientFirst => "AwaitClientFirst",
            ScramState::AwaitClientFinal(_) => "AwaitClientFinal",
            ScramState::Done => "Done",
        };
        f.debug_struct("ScramServer")
            .field("verifier", &self.verifier)
            .field("doomed", &self.doomed)
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

fn random_server_nonce() -> String {
    let mut raw = [0u8; SERVER_NONCE_RAW_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    STANDARD.encode(raw)
}

struct ClientFirst<'a> {
    cbind_flag: CbindFlag,
    /// client-first-message-bare: everything after the gs2 header.
    bare: &'a [u8],
    client_nonce: &'a [u8],
}

/// `gs2-cbind-flag "," [authzid] "," [reserved-mext ","] username "," nonce ["," extensions]`
fn parse_client_first(msg: &[u8]) -> Result<ClientFirst<'_>, AuthError> {
    // PostgreSQL reads the message as a C string and rejects embedded NULs.
    if msg.contains(&0) {
        return Err(AuthError::Protocol("message contains a NUL byte"));
    }
    let (cbind_flag, rest) = match msg {
        [b'n', rest @ ..] => (CbindFlag::No, rest),
        [b'y', rest @ ..] => (CbindFlag::Yes, rest),
        [b'p', ..] => {
            return Err(AuthError::Protocol(
                "client requires channel binding, but SCRAM-SHA-256 was selected without it",
            ))
        }
        _ => return Err(AuthError::Protocol("unexpected channel-binding flag")),
    };
    let rest = rest.strip_prefix(b",").ok_or(AuthError::Protocol(
        "comma expected after channel-binding flag",
    ))?;
    let bare = match rest {
        [b',', bare @ ..] => bare,
        [b'a', ..] => {
            return Err(AuthError::Protocol(
                "authorization identity is not supported",
            ))
        }
        _ => return Err(AuthError::Protocol("unexpected attribute in gs2 header")),
    };
    if bare.first() == Some(&b'm') {
        return Err(AuthError::Protocol(
            "mandatory SCRAM extension is not supported",
        ));
    }
    let mut attrs = Attrs::new(bare);
    // The user name is ignored, as PostgreSQL does: the startup packet's counts.
    attrs.expect(b'n', "user name attribute expected")?;
    let client_nonce = attrs.expect(b'r', "nonce attribute expected")?.value;
    if client_nonce.is_empty() || !client_nonce.iter().all(|&b| is_scram_printable(b)) {
        return Err(AuthError::Protocol(
            "nonce must be printable ASCII without commas",
        ));
    }
    // Optional extensions: well-formed attributes, ignored.
    while attrs.next()?.is_some() {}
    Ok(ClientFirst {
        cbind_flag,
        bare,
        client_nonce,
    })
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
fn is_scram_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

struct ClientFinal<'a> {
    channel_binding: &'a [u8],
    nonce: &'a [u8],
    /// client-final-message-without-proof: everything before ",p=".
    without_proof: &'a [u8],
    proof: [u8; SCRAM_KEY_LEN],
}

/// `channel-binding "," nonce ["," extensions] "," proof`
fn parse_client_final(msg: &[u8]) -> Result<ClientFinal<'_>, AuthError> {
    if msg.contains(&0) {
        return Err(AuthError::Protocol("message contains a NUL byte"));
    }
    let mut attrs = Attrs::new(msg);
    let channel_binding = attrs
        .expect(b'c', "channel-binding attribute expected")?
        .value;
    let nonce = attrs.expect(b'r', "nonce attribute expected")?.value;
    let proof = loop {
        match attrs.next()? {
            Some(attr) if attr.name == b'p' => break attr,
            // Extensions before the proof are ignored, as PostgreSQL does.
            Some(_) => {}
            None => return Err(AuthError::Protocol("proof attribute expected")),
        }
    };
    if !attrs.at_end() {
        return Err(AuthError::Protocol(
            "garbage at end of client-final-message",
        ));
    }
    // The proof follows at least `c` and `r`, so a comma precedes it.
    let without_proof = proof
        .start
        .checked_sub(1)
        .and_then(|end| msg.get(..end))
        .ok_or(AuthError::Protocol("proof attribute expected"))?;
    if proof.value.len() != SCRAM_KEY_B64_LEN {
        return Err(AuthError::Protocol("invalid proof length"));
    }
    let proof = STANDARD
        .decode(proof.value)
        .ok()
        .and_then(|bytes| <[u8; SCRAM_KEY_LEN]>::try_from(bytes.as_slice()).ok())
        .ok_or(AuthError::Protocol("proof is not valid base64 of 32 bytes"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// One `name=value` attribute of a SCRAM message.
struct Attr<'a> {
    name: u8,
    value: &'a [u8],
    /// Offset of `name` in the message.
    start: usize,
}

/// Reads comma-separated `name=value` attributes, where `name` is one
/// ASCII letter and `value` runs to the next comma (RFC 5802, section 7).
struct Attrs<'a> {
    msg: &'a [u8],
    /// Offset of the next attribute; `None` after the last one.
    pos: Option<usize>,
}

impl<'a> Attrs<'a> {
    fn new(msg: &'a [u8]) -> Attrs<'a> {
        Attrs { msg, pos: Some(0) }
    }

    fn at_end(&self) -> bool {
        self.pos.is_none()
    }

    fn next(&mut self) -> Result<Option<Attr<'a>>, AuthError> {
        let Some(start) = self.pos else {
            return Ok(None);
        };
        let rest = self.msg.get(start..).unwrap_or_default();
        let (field, next) = match rest.iter().position(|&b| b == b',') {
            Some(comma) => (&rest[..comma], Some(start + comma + 1)),
            None => (rest, None),
        };
        match field {
            [name, b'=', value @ ..] if name.is_ascii_alphabetic() => {
                self.pos = next;
                Ok(Some(Attr {
                    name: *name,
                    value,
                    start,
                }))
            }
            _ => Err(AuthError::Protocol("malformed attribute")),
        }
    }

    fn expect(&mut self, name: u8, missing: &'static str) -> Result<Attr<'a>, AuthError> {
        match self.next()? {
            Some(attr) if attr.name == name => Ok(attr),
            _ => Err(AuthError::Protocol(missing)),
        }
    }
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; SCRAM_KEY_LEN] {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA-256 accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares without an early exit, so the time taken does not tell how many
/// leading bytes matched. Lengths are not secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A fresh salt for AuthenticationMD5Password (B).
pub fn md5_salt() -> [u8; 4] {
    rand::random()
}

/// Checks the PasswordMessage (F) answering AuthenticationMD5Password (B)
/// with `salt`: the client sends `"md5" + md5hex(md5hex(password + user) + salt)`.
/// `response` may keep the message's terminating NUL. Works for
/// [`StoredSecret::Plain`] and [`StoredSecret::Md5`] (which must have been made
/// with this `user`); always `false` for [`StoredSecret::Scram`], since md5
/// cannot be checked against a SCRAM verifier.
pub fn md5_check(secret: &StoredSecret, user: &str, salt: [u8; 4], response: &[u8]) -> bool {
    let inner = match secret {
        StoredSecret::Plain(password) => md5_hex(&[password.as_bytes(), user.as_bytes()]),
        StoredSecret::Md5(hex) => *hex,
        StoredSecret::Scram(_) => return false,
    };
    let expected = md5_hex(&[&inner, &salt]);
    let response = response.strip_suffix(&[0]).unwrap_or(response);
    match response.strip_prefix(MD5_PREFIX) {
        Some(hex) => ct_eq(hex, &expected),
        None => false,
    }
}

/// md5 of the concatenated parts, as lowercase hex.
fn md5_hex(parts: &[&[u8]]) -> [u8; MD5_HEX_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut md5 = Md5::new();
    for part in parts {
        md5.update(part);
    }
    let digest = md5.finalize();
    let mut out = [0u8; MD5_HEX_LEN];
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0x0f)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::panic::{catch_unwind, AssertUnwindSafe};

    const PASSWORD: &str = "correct horse battery staple";

    /// Runs a whole exchange with postgres-protocol's client; returns the
    /// server's verdict and, on success, whether the client accepted the
    /// server's signature.
    fn exchange(
        verifier: &ScramVerifier,
        password: &str,
        binding: ChannelBinding,
    ) -> Result<std::io::Result<()>, AuthError> {
        let mut server = ScramServer::new(verifier.clone());
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let server_first = server.client_first(client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first-message");
        let server_final = server.client_final(client.message())?;
        Ok(client.finish(&server_final))
    }

    #[test]
    fn scram_exchange_with_postgres_protocol_client() {
        // Non-ASCII space is mapped to ' ' by SASLprep on both sides.
        let nbsp_password = "pass\u{00A0}word";
        // (stored password, tried password, client's channel binding, accepted)
        type Case = (&'static str, &'static str, fn() -> ChannelBinding, bool);
        let cases: &[Case] = &[
            (PASSWORD, PASSWORD, ChannelBinding::unsupported, true),
            (PASSWORD, PASSWORD, ChannelBinding::unrequested, true),
            (PASSWORD, "wrong", ChannelBinding::unsupported, false),
            (PASSWORD, "", ChannelBinding::unrequested, false),
            (
                nbsp_password,
                nbsp_password,
                ChannelBinding::unsupported,
                true,
            ),
            (
                nbsp_password,
                "pass word",
                ChannelBinding::unsupported,
                true,
            ),
            ("", "", ChannelBinding::unsupported, true),
        ];
        for &(stored, tried, binding, ok) in cases {
            // Both ways of getting a verifier: from the config's plaintext, and
            // from a verifier string as PostgreSQL stores it.
            let from_plain = ScramVerifier::from_password(stored);
            let StoredSecret::Scram(from_string) = StoredSecret::parse(
                &postgres_protocol::password::scram_sha_256(stored.as_bytes()),
            ) else {
                panic!("postgres-protocol verifier for {stored:?} did not parse as SCRAM");
            };
            for verifier in [&from_plain, &from_string] {
                let result = exchange(verifier, tried, binding());
                if ok {
                    let client_verdict = result.unwrap_or_else(|e| {
                        panic!("stored {stored:?}, tried {tried:?}: server said {e}")
                    });
                    assert!(
                        client_verdict.is_ok(),
                        "client rejected server signature: {client_verdict:?}"
                    );
                } else {
                    assert_eq!(
                        result.err(),
                        Some(AuthError::WrongPassword),
                        "tried {tried:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn scram_rejects_channel_binding_request() {
        let mut server = ScramServer::new(ScramVerifier::from_password(PASSWORD));
        let client = ScramSha256::new(
            PASSWORD.as_bytes(),
            ChannelBinding::tls_server_end_point(vec![1, 2, 3]),
        );
        assert!(matches!(
            server.client_first(client.message()),
            Err(AuthError::Protocol(_))
        ));
    }

    #[test]
    fn scram_client_first_table() {
        // (message, client nonce if accepted)
        let cases: &[(&[u8], Option<&[u8]>)] = &[
            (b"n,,n=,r=abc", Some(b"abc")),
            (b"y,,n=,r=abc", Some(b"abc")),
            (b"n,,n=someone,r=abc", Some(b"abc")),
            (b"n,,n=,r=abc,x=ext,y=", Some(b"abc")),
            (b"n,,n=,r=!~+-./", Some(b"!~+-./")),
            (b"p=tls-server-end-point,,n=,r=abc", None),
            (b"x,,n=,r=abc", None),
            (b"n,a=admin,n=,r=abc", None),
            (b"n,x,n=,r=abc", None),
            (b"n,,m=ext,n=,r=abc", None),
            (b"n,,r=abc", None),
            (b"n,,n=,", None),
            (b"n,,n=", None),
            (b"n,,n=,r=", None),
            (b"n,,n=,r=ab c", None),
            (b"n,,n=,r=ab\x7f", None),
            (b"n,,n=,r=ab\xc3\xa9", None),
            (b"n,,n=,r=ab\0c", None),
            (b"n,,n=us\0er,r=abc", None),
            (b"n,,n=,r=abc,x=\0", None),
            (b"n,,n=,r=abc,", None),
            (b"n,,n=,r=abc,1=x", None),
            (b"n,,n=,r=abc,xx", None),
            (b"n,,", None),
            (b"n,", None),
            (b"n", None),
            (b"", None),
        ];
        let verifier = ScramVerifier::from_password(PASSWORD);
        for &(msg, client_nonce) in cases {
            let mut server = ScramServer::new(verifier.clone());
            let result = server.client_first(msg);
            let shown = String::from_utf8_lossy(msg);
            match client_nonce {
                Some(client_nonce) => {
                    let server_first = result.unwrap_or_else(|e| panic!("{shown:?}: {e}"));
                    let expected = format!(
                        "r={}{},s={},i=4096",
                        String::from_utf8_lossy(client_nonce),
                        server.server_nonce,
                        STANDARD.encode(verifier.salt()),
                    );
                    assert_eq!(
                        String::from_utf8_lossy(&server_first),
                        expected,
                        "{shown:?}"
                    );
                }
                None => assert!(
                    matches!(result, Err(AuthError::Protocol(_))),
                    "{shown:?} gave {result:?}"
                ),
            }
        }
    }

    /// Hi() of RFC 5802: PBKDF2 with HMAC-SHA-256, for the hand-made client.
    fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut prev = hmac_sha256(password, &[salt, &[0, 0, 0, 1]]);
        let mut out = prev;
        for _ in 1..iterations {
            prev = hmac_sha256(password, &[&prev]);
            for (o, p) in out.iter_mut().zip(prev) {
                *o ^= p;
            }
        }
        out
    }

    /// A client-side computation of the proof, to write client-final
    /// messages that postgres-protocol would never send.
    struct HandClient {
        salted_password: [u8; 32],
        client_first_bare: Vec<u8>,
        server_first: Vec<u8>,
        nonce: String,
    }

    impl HandClient {
        fn start(server: &mut ScramServer, password: &str) -> HandClient {
            let client_first_bare = b"n=,r=hand-made-nonce".to_vec();
            let mut msg = b"n,,".to_vec();
            msg.extend_from_slice(&client_first_bare);
            let server_first = server.client_first(&msg).expect("valid client-first");
            let text = String::from_utf8(server_first.clone()).expect("server-first is ASCII");
            let mut parts = text.split(',');
            let nonce = parts.next().and_then(|p| p.strip_prefix("r=")).expect("r=");
            let salt = parts.next().and_then(|p| p.strip_prefix("s=")).expect("s=");
            let iterations = parts.next().and_then(|p| p.strip_prefix("i=")).expect("i=");
            assert!(nonce.starts_with("hand-made-nonce"));
            let salt = STANDARD.decode(salt).expect("salt is base64");
            let iterations: u32 = iterations.parse().expect("i is a number");
            HandClient {
                salted_password: hi(password.as_bytes(), &salt, iterations),
                client_first_bare,
                server_first,
                nonce: nonce.to_owned(),
            }
        }

        fn auth_message<'a>(&'a self, without_proof: &'a [u8]) -> [&'a [u8]; 5] {
            [
                &self.client_first_bare,
                b",",
                &self.server_first,
                b",",
                without_proof,
            ]
        }

        /// `without_proof` + ",p=" + the proof over it.
        fn finish(&self, without_proof: &str) -> Vec<u8> {
            let client_key = hmac_sha256(&self.salted_password, &[b"Client Key"]);
            let stored_key: [u8; 32] = Sha256::digest(client_key).into();
            let signature = hmac_sha256(&stored_key, &self.auth_message(without_proof.as_bytes()));
            let mut proof = client_key;
            for (p, s) in proof.iter_mut().zip(signature) {
                *p ^= s;
            }
            format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes()
        }

        fn expected_server_final(&self, without_proof: &str) -> Vec<u8> {
            let server_key = hmac_sha256(&self.salted_password, &[b"Server Key"]);
            let signature = hmac_sha256(&server_key, &self.auth_message(without_proof.as_bytes()));
            format!("v={}", STANDARD.encode(signature)).into_bytes()
        }
    }

    #[test]
    fn scram_client_final_table() {
        let verifier = ScramVerifier::from_password(PASSWORD);
        type Build = fn(&HandClient) -> Vec<u8>;
        // (name, message builder, expected outcome: None = accepted)
        let cases: &[(&str, Build, Option<AuthError>)] = &[
            (
                "valid",
                |c| c.finish(&format!("c=biws,r={}", c.nonce)),
                None,
            ),
            (
                "extension before proof is ignored but signed",
                |c| c.finish(&format!("c=biws,r={},x=ext", c.nonce)),
                None,
            ),
            (
                "channel binding differs from client-first",
                |c| c.finish(&format!("c=eSws,r={}", c.nonce)),
                Some(AuthError::Protocol("")),
            ),
            (
                "nonce extended",
                |c| c.finish(&format!("c=biws,r={}x", c.nonce)),
                Some(AuthError::Protocol("")),
            ),
            (
                "client nonce only",
                |c| c.finish("c=biws,r=hand-made-nonce"),
                Some(AuthError::Protocol("")),
            ),
            (
                "no proof",
                |c| format!("c=biws,r={}", c.nonce).into_bytes(),
                Some(AuthError::Protocol("")),
            ),
            (
                "garbage after proof",
                |c| {
                    let mut m = c.finish(&format!("c=biws,r={}", c.nonce));
                    m.extend_from_slice(b",x=1");
                    m
                },
                Some(AuthError::Protocol("")),
            ),
            (
                "short proof",
                |c| format!("c=biws,r={},p={}", c.nonce, STANDARD.encode([7u8; 31])).into_bytes(),
                Some(AuthError::Protocol("")),
            ),
            (
                "proof not base64",
                |c| format!("c=biws,r={},p={}", c.nonce, "*".repeat(44)).into_bytes(),
                Some(AuthError::Protocol("")),
            ),
            (
                "NUL in an extension",
                |c| c.finish(&format!("c=biws,r={},x=\0", c.nonce)),
                Some(AuthError::Protocol("")),
            ),
            (
                "attributes out of order",
                |c| c.finish(&format!("r={},c=biws", c.nonce)),
                Some(AuthError::Protocol("")),
            ),
            (
                "proof for a different message",
                |c| {
                    let good = c.finish(&format!("c=biws,r={},x=1", c.nonce));
                    let proof_at = good.len() - SCRAM_KEY_B64_LEN;
                    let mut m = format!("c=biws,r={},x=2,p=", c.nonce).into_bytes();
                    m.extend_from_slice(&good[proof_at..]);
                    m
                },
                Some(AuthError::WrongPassword),
            ),
            (
                "random proof",
                |c| format!("c=biws,r={},p={}", c.nonce, STANDARD.encode([7u8; 32])).into_bytes(),
                Some(AuthError::WrongPassword),
            ),
        ];
        for &(name, build, ref expected) in cases {
            let mut server = ScramServer::new(verifier.clone());
            let client = HandClient::start(&mut server, PASSWORD);
            let msg = build(&client);
            let result = server.client_final(&msg);
            match (expected, &result) {
                (None, Ok(server_final)) => {
                    let text = String::from_utf8_lossy(&msg);
                    let without_proof = &text[..text.len() - ",p=".len() - SCRAM_KEY_B64_LEN];
                    assert_eq!(
                        *server_final,
                        client.expected_server_final(without_proof),
                        "{name}"
                    );
                }
                (Some(AuthError::Protocol(_)), Err(AuthError::Protocol(_))) => {}
                (Some(AuthError::WrongPassword), Err(AuthError::WrongPassword)) => {}
                _ => panic!("{name}: expected {expected:?}, got {result:?}"),
            }
            // Whatever happened, the exchange is over.
            assert_eq!(
                server.client_final(&msg),
                Err(AuthError::OutOfOrder),
                "{name}"
            );
        }
    }

    #[test]
    fn scram_steps_out_of_order() {
        let verifier = ScramVerifier::from_password(PASSWORD);

        let mut server = ScramServer::new(verifier.clone());
        assert_eq!(
            server.client_final(b"c=biws,r=x,p=y"),
            Err(AuthError::OutOfOrder)
        );
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(AuthError::OutOfOrder)
        );

        let mut server = ScramServer::new(verifier.clone());
        assert!(server.client_first(b"n,,n=,r=abc").is_ok());
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(AuthError::OutOfOrder)
        );

        let mut server = ScramServer::new(verifier);
        assert!(matches!(
            server.client_first(b"garbage"),
            Err(AuthError::Protocol(_))
        ));
        assert_eq!(
            server.client_first(b"n,,n=,r=abc"),
            Err(AuthError::OutOfOrder)
        );
    }

    #[test]
    fn scram_server_nonce_is_fresh_base64_of_18_bytes() {
        let verifier = ScramVerifier::from_password(PASSWORD);
        let a = ScramServer::new(verifier.clone()).server_nonce;
        let b = ScramServer::new(verifier).server_nonce;
        assert_ne!(a, b);
        for nonce in [a, b] {
            assert_eq!(nonce.len(), 24);
            assert_eq!(STANDARD.decode(&nonce).map(|raw| raw.len()), Ok(18));
            assert!(nonce.bytes().all(is_scram_printable));
        }
    }

    #[test]
    fn scram_mock_is_stable_per_user_and_always_fails() {
        let mock_nonce = [42u8; 32];
        let salt_of = |user: &str| {
            let mut server = ScramServer::mock(user, &mock_nonce);
            let first = server
                .client_first(b"n,,n=,r=abc")
                .expect("valid client-first");
            String::from_utf8(first)
                .expect("ASCII")
                .split(',')
                .find_map(|p| p.strip_prefix("s=").map(str::to_owned))
                .expect("server-first has a salt")
        };
        assert_eq!(salt_of("alice"), salt_of("alice"));
        assert_ne!(salt_of("alice"), salt_of("bob"));

        let mut server = ScramServer::mock("alice", &mock_nonce);
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let server_first = server
            .client_first(client.message())
            .expect("valid client-first");
        client
            .update(&server_first)
            .expect("mock looks like a real server");
        assert_eq!(
            server.client_final(client.message()),
            Err(AuthError::WrongPassword)
        );
    }

    /// Runs `f` and fails with the input shown if it panics.
    fn no_panic<T>(what: &str, input: &[u8], f: impl FnOnce() -> T) -> T {
        catch_unwind(AssertUnwindSafe(f))
            .unwrap_or_else(|_| panic!("{what} panicked on input {input:02x?}"))
    }

    #[test]
    fn scram_never_panics_on_garbage() {
        const SEED: u64 = 0x5eed_a17a;
        const ALPHABET: &[u8] = b"nypcrmsiva,=,,0123456789+/ \0\xff";
        let verifier = ScramVerifier::from_password(PASSWORD);
        let mut rng = StdRng::seed_from_u64(SEED);
        for case in 0..2000 {
            let len = rng.gen_range(0..48);
            let msg: Vec<u8> = if case % 2 == 0 {
                (0..len).map(|_| rng.gen()).collect()
            } else {
                (0..len)
                    .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())])
                    .collect()
            };
            let ctx = format!("seed {SEED:#x}, case {case}");

            let mut server = ScramServer::new(verifier.clone());
            let first = no_panic(&ctx, &msg, || server.client_first(&msg));
            assert!(
                matches!(first, Ok(_) | Err(AuthError::Protocol(_))),
                "{ctx}: client_first({msg:02x?}) gave {first:?}"
            );

            let mut server = ScramServer::new(verifier.clone());
            server
                .client_first(b"n,,n=,r=abc")
                .expect("valid client-first");
            let fin = no_panic(&ctx, &msg, || server.client_final(&msg));
            assert!(
                matches!(fin, Err(AuthError::Protocol(_))),
                "{ctx}: client_final({msg:02x?}) gave {fin:?}"
            );
        }
    }

    #[test]
    fn scram_truncated_and_mutated_messages_are_rejected() {
        let verifier = ScramVerifier::from_password(PASSWORD);
        let mut server = ScramServer::new(verifier.clone());
        let nonce = server.server_nonce.clone();
        let client = HandClient::start(&mut server, PASSWORD);
        let good_final = client.finish(&format!("c=biws,r={}", client.nonce));
        let replay = |msg: &[u8]| {
            let mut server = ScramServer::build(verifier.clone(), nonce.clone(), false);
            let first = b"n,,n=,r=hand-made-nonce";
            server.client_first(first).expect("valid client-first");
            no_panic("client_final", msg, || server.client_final(msg))
        };
        assert!(replay(&good_final).is_ok(), "unchanged message must pass");

        for len in 0..good_final.len() {
            let msg = &good_final[..len];
            let result = replay(msg);
            assert!(
                matches!(result, Err(AuthError::Protocol(_))),
                "truncated to {len}: {result:?}"
            );
        }
        for at in 0..good_final.len() {
            for byte in [b',', b'=', b'A', b'\0', 0xff] {
                let mut msg = good_final.clone();
                if msg[at] == byte {
                    continue;
                }
                msg[at] = byte;
                let result = replay(&msg);
                assert!(
                    matches!(
                        result,
                        Err(AuthError::Protocol(_) | AuthError::WrongPassword)
                    ),
                    "byte {at} set to {byte:#x}: {result:?}"
                );
            }
        }

        let good_first = b"n,,n=,r=hand-made-nonce";
        for len in 0..good_first.len() {
            let msg = &good_first[..len];
            let mut server = ScramServer::new(verifier.clone());
            let result = no_panic("client_first", msg, || server.client_first(msg));
            // A shorter nonce is still a valid nonce.
            assert!(
                matches!(result, Ok(_) | Err(AuthError::Protocol(_))),
                "{result:?}"
            );
        }
    }

    #[test]
    fn scram_verifier_round_trips_postgres_protocol_format() {
        for password in ["", "hunter2", PASSWORD, "pässwörd", "with$dollar:colon"] {
            let encoded = postgres_protocol::password::scram_sha_256(password.as_bytes());
            let verifier = ScramVerifier::parse(&encoded)
                .unwrap_or_else(|| panic!("{encoded:?} should parse"));
            assert_eq!(verifier.iterations(), 4096);
            assert_eq!(verifier.salt().len(), 16);
            assert_eq!(verifier.encode(), encoded);
            assert_eq!(StoredSecret::parse(&encoded), StoredSecret::Scram(verifier));
        }
    }

    #[test]
    fn scram_verifier_rejects_malformed() {
        let key = STANDARD.encode([1u8; 32]);
        let short_key = STANDARD.encode([1u8; 31]);
        let salt = STANDARD.encode([2u8; 16]);
        let cases = [
            format!("SCRAM-SHA-256$4096:{salt}${key}:{key}"),
            format!("SCRAM-SHA-1$4096:{salt}${key}:{key}"),
            format!("scram-sha-256$4096:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$0:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$+4096:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$-1:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$4294967296:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$:{salt}${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:not*base64${key}:{key}"),
            format!("SCRAM-SHA-256$4096:{salt}${short_key}:{key}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{short_key}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{key}:"),
            format!("SCRAM-SHA-256$4096:{salt}${key}:{key}$"),
            format!("SCRAM-SHA-256$4096{salt}${key}:{key}"),
            "SCRAM-SHA-256$".to_owned(),
        ];
        for (i, case) in cases.iter().enumerate() {
            let parsed = ScramVerifier::parse(case);
            assert_eq!(parsed.is_some(), i == 0, "{case:?}");
            // A verifier that does not parse is a plaintext password, as in PostgreSQL.
            if i > 0 {
                assert_eq!(StoredSecret::parse(case), StoredSecret::Plain(case.clone()));
            }
        }
    }

    #[test]
    fn stored_secret_parse_table() {
        let hex = "0123456789abcdef0123456789abcdef";
        let md5 = |h: &str| StoredSecret::Md5(h.as_bytes().try_into().expect("32 bytes"));
        let plain = |s: &str| StoredSecret::Plain(s.to_owned());
        let cases = [
            (format!("md5{hex}"), md5(hex)),
            (
                format!("md5{}", hex.to_uppercase()),
                plain(&format!("md5{}", hex.to_uppercase())),
            ),
            (
                format!("md5{}", &hex[1..]),
                plain(&format!("md5{}", &hex[1..])),
            ),
            (format!("md5{hex}0"), plain(&format!("md5{hex}0"))),
            (
                format!("md5{}g", &hex[1..]),
                plain(&format!("md5{}g", &hex[1..])),
            ),
            (hex.to_owned(), plain(hex)),
            ("hunter2".to_owned(), plain("hunter2")),
            (String::new(), plain("")),
        ];
        for (input, expected) in cases {
            assert_eq!(StoredSecret::parse(&input), expected, "{input:?}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let secrets = [
            StoredSecret::parse("hunter2"),
            StoredSecret::parse(&postgres_protocol::password::md5(b"hunter2", "alice")),
            StoredSecret::Scram(ScramVerifier::from_password("hunter2")),
        ];
        for secret in &secrets {
            let shown = format!("{secret:?}");
            assert!(!shown.contains("hunter2"), "{shown}");
            if let StoredSecret::Scram(v) = secret {
                assert!(!shown.contains(&STANDARD.encode(v.stored_key)), "{shown}");
            }
        }
    }

    #[test]
    fn md5_check_against_postgres_protocol() {
        let user = "alice";
        let salt = [0x01, 0x7f, 0x80, 0xff];
        let plain = StoredSecret::parse(PASSWORD);
        let stored_md5 =
            StoredSecret::parse(&postgres_protocol::password::md5(PASSWORD.as_bytes(), user));
        assert!(matches!(plain, StoredSecret::Plain(_)));
        assert!(matches!(stored_md5, StoredSecret::Md5(_)));
        let scram = StoredSecret::Scram(ScramVerifier::from_password(PASSWORD));

        let good = md5_hash(user.as_bytes(), PASSWORD.as_bytes(), salt);
        let mut good_nul = good.clone().into_bytes();
        good_nul.push(0);
        let wrong_password = md5_hash(user.as_bytes(), b"wrong", salt);
        let wrong_user = md5_hash(b"bob", PASSWORD.as_bytes(), salt);
        let wrong_salt = md5_hash(user.as_bytes(), PASSWORD.as_bytes(), [0, 0, 0, 0]);
        let uppercase = good.to_uppercase();
        let cases: &[(&[u8], bool)] = &[
            (good.as_bytes(), true),
            (&good_nul, true),
            (wrong_password.as_bytes(), false),
            (wrong_user.as_bytes(), false),
            (wrong_salt.as_bytes(), false),
            (uppercase.as_bytes(), false),
            (&good.as_bytes()[3..], false),
            (&good.as_bytes()[..34], false),
            (b"md5", false),
            (b"", false),
            (b"\0", false),
            (PASSWORD.as_bytes(), false),
        ];
        for secret in [&plain, &stored_md5] {
            for &(response, ok) in cases {
                assert_eq!(
                    md5_check(secret, user, salt, response),
                    ok,
                    "{secret:?} with {:?}",
                    String::from_utf8_lossy(response)
                );
            }
        }
        // No md5 against a SCRAM verifier, even with the right answer.
        assert!(!md5_check(&scram, user, salt, good.as_bytes()));
        // An md5-stored secret is tied to the user it was made for.
        let for_bob = md5_hash(b"bob", PASSWORD.as_bytes(), salt);
        assert!(!md5_check(&stored_md5, "bob", salt, for_bob.as_bytes()));
        assert!(md5_check(&plain, "bob", salt, for_bob.as_bytes()));
    }

    #[test]
    fn md5_salts_differ() {
        let salts: std::collections::HashSet<[u8; 4]> = (0..16).map(|_| md5_salt()).collect();
        assert!(salts.len() > 1);
    }
}
