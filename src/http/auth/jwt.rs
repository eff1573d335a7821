//! JSON Web Tokens: the keys they are verified with (`--jwt-secret-file`,
//! `--jwt-public-key`, `--jwt-jwks`), the claims checked, and the `bus` claim's grants.
//!
//! Which key verifies a token follows its header: `HS256`/`HS384`/`HS512` only ever the
//! secret; anything else a public key — the JWKS key its `kid` names (or the JWKS's only
//! key when the header names none), else `--jwt-public-key`. Each key takes only the
//! algorithms of its own type: an RSA key RS256/384/512 and PS256/384/512, an EC key
//! ES256 (P-256) or ES384 (P-384), an Ed25519 key EdDSA. So a token signed with HS256
//! "using the public key as the secret" (algorithm confusion) is refused, and `none` is
//! never an algorithm.
//!
//! Claims checked: the signature; `exp`, required; `nbf` when present; `sub`, required
//! (the token's owner, see below); `aud` must contain `--jwt-audience` when that is set;
//! `iss` must be `--jwt-issuer` when that is set. Times are compared with a leeway of
//! [`LEEWAY_SECS`] for clocks that disagree a little.
//!
//! The grants are the `bus` claim, lists of subject patterns per operation (see
//! [`super::grants`]): `{"publish":["chat.room1"],"subscribe":["chat.>"],"ack":["chat.>"],
//! "admin":["orders.>"],"metrics":[">"]}`; a missing operation grants nothing, an unknown
//! one or a bad pattern is a 401 that names it. The owner of what a token opens is
//! derived from `iss` and `sub`, so a renewed token of the same subject keeps its durable
//! consumers.

use std::path::{Path, PathBuf};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::grants::{Grants, Operation, Source};
use super::ring_provider;
use crate::broker::Owner;

/// Seconds by which `exp` and `nbf` may be off: a token is accepted until 30 s after its
/// `exp`, and from 30 s before its `nbf`, so that clocks a little apart agree.
pub const LEEWAY_SECS: u64 = 30;

/// The name of the claim that holds a token's grants.
pub const GRANTS_CLAIM: &str = "bus";

/// Where the JWT keys are, and what the claims must say (plain settings, from the
/// server's flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtSettings {
    /// A file holding the HS256 secret (its content, surrounding whitespace trimmed).
    pub secret_file: Option<PathBuf>,
    /// A PEM public key: RSA, EC P-256/P-384 or Ed25519.
    pub public_key: Option<PathBuf>,
    /// A JWKS file (`{"keys":[…]}`).
    pub jwks: Option<PathBuf>,
    /// When set, `aud` must contain it.
    pub audience: Option<String>,
    /// When set, `iss` must be it.
    pub issuer: Option<String>,
}

impl JwtSettings {
    /// Whether any key is configured (JWTs are accepted at all).
    pub fn is_set(&self) -> bool {
        self.secret_file.is_some() || self.public_key.is_some() || self.jwks.is_some()
    }
}

/// A key and how a token verified with it is checked.
struct Key {
    decoding: DecodingKey,
    validation: Validation,
}

impl Key {
    fn new(decoding: DecodingKey, algorithms: Vec<Algorithm>, settings: &JwtSettings) -> Key {
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &settings.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // Without an audience of its own the server has none to compare with.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &settings.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Key {
            decoding,
            validation,
        }
    }

    fn algorithm_names(&self) -> String {
        names(&self.validation.algorithms)
    }
}

fn names(algorithms: &[Algorithm]) -> String {
    algorithms
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The configured keys, loaded.
pub struct JwtKeys {
    secret: Option<Key>,
    public: Option<Key>,
    jwks: Vec<(Option<String>, Key)>,
    settings: JwtSettings,
}

/// What a verified token says.
#[derive(Debug)]
pub struct Verified {
    /// What its `bus` claim grants.
    pub grants: Grants,
    /// Its identity as an owner, from `iss` and `sub`.
    pub owner: Owner,
    /// The last second (Unix time) it is accepted: its `exp` plus the leeway.
    pub expires: u64,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    iss: Option<String>,
    exp: u64,
    #[serde(default)]
    bus: Option<GrantsClaim>,
}

/// The `bus` claim.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GrantsClaim {
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    ack: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
    #[serde(default)]
    metrics: Vec<String>,
}

impl JwtKeys {
    /// Reads the configured key files (blocking); an error names the flag, the file and
    /// what is wrong.
    pub fn load(settings: &JwtSettings) -> Result<JwtKeys, String> {
        ring_provider::install();
        let secret = match &settings.secret_file {
            None => None,
            Some(path) => Some(Key::new(
                load_secret(path)?,
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
                settings,
            )),
        };
        let public = match &settings.public_key {
            None => None,
            Some(path) => {
                let (decoding, algorithms) = load_public_key(path)?;
                Some(Key::new(decoding, algorithms, settings))
            }
        };
        let jwks = match &settings.jwks {
            None => Vec::new(),
            Some(path) => load_jwks(path)?
                .into_iter()
                .map(|(kid, decoding, algorithms)| (kid, Key::new(decoding, algorithms, settings)))
                .collect(),
        };
        Ok(JwtKeys {
            secret,
            public,
            jwks,
            settings: settings.clone(),
        })
    }

    /// What was loaded, for the log and `/admin/reload`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.secret.is_some() {
            parts.push("an HS256 secret".to_owned());
        }
        if let Some(key) = &self.public {
            parts.push(format!("a public key ({})", key.algorithm_names()));
        }
        if !self.jwks.is_empty() {
            parts.push(format!("a JWKS of {} keys", self.jwks.len()));
        }
        format!("JWT: {}", parts.join(", "))
    }

    /// Verifies `token` and reads its grants; the error is the sentence of a 401, saying
    /// what to fix.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            "the token is not a valid JWT: its header is not base64url JSON with a known alg \
             (none is never accepted)"
                .to_owned()
        })?;
        let key = self.key_for(header.alg, header.kid.as_deref())?;
        if !key.validation.algorithms.contains(&header.alg) {
            return Err(format!(
                "the token is signed with {:?}, but the server's key for it takes only {}",
                header.alg,
                key.algorithm_names()
            ));
        }
        let claims =
            jsonwebtoken::decode::<serde_json::Value>(token, &key.decoding, &key.validation)
                .map_err(|e| self.explain(e.kind()))?
                .claims;
        let claims: Claims = serde_json::from_value(claims).map_err(|e| {
            format!("the token's claims: {e} (sub is a string, exp a number of seconds)")
        })?;
        let mut grants = Grants::new(Source::Jwt);
        let claim = claims.bus.unwrap_or_default();
        for (operation, patterns) in [
            (Operation::Publish, &claim.publish),
            (Operation::Subscribe, &claim.subscribe),
            (Operation::Ack, &claim.ack),
            (Operation::Admin, &claim.admin),
            (Operation::Metrics, &claim.metrics),
        ] {
            for pattern in patterns {
                grants.add(operation, pattern).map_err(|e| {
                    format!(
                        "the token's {GRANTS_CLAIM:?} claim, {}: {e}",
                        operation.name()
                    )
                })?;
            }
        }
        Ok(Verified {
            grants,
            owner: owner_of(claims.iss.as_deref(), &claims.sub),
            expires: claims.exp.saturating_add(LEEWAY_SECS),
        })
    }

    fn key_for(&self, algorithm: Algorithm, kid: Option<&str>) -> Result<&Key, String> {
        if algorithm.family() == AlgorithmFamily::Hmac {
            return self.secret.as_ref().ok_or_else(|| {
                format!(
                    "the token is signed with {algorithm:?}, a shared secret, which this server \
                     does not take (it has no --jwt-secret-file); sign with its public key's algorithm"
                )
            });
        }
        if !self.jwks.is_empty() {
            let found = match kid {
                Some(kid) => self
                    .jwks
                    .iter()
                    .find(|(id, _)| id.as_deref() == Some(kid))
                    .map(|(_, key)| key),
                None if self.jwks.len() == 1 => self.jwks.first().map(|(_, key)| key),
                None => None,
            };
            if let Some(key) = found {
                return Ok(key);
            }
            if self.public.is_none() {
                return Err(match kid {
                    Some(kid) => format!(
                        "the token's kid {kid:?} is not in the server's JWKS (--jwt-jwks); \
                         sign with a key it lists"
                    ),
                    None => "the token's header has no kid, and the server's JWKS holds several \
                             keys: name the signing key in the header's kid"
                        .to_owned(),
                });
            }
        }
        self.public.as_ref().ok_or_else(|| {
            format!(
                "the token is signed with {algorithm:?}, but this server verifies only HS256 tokens \
                 (it has no --jwt-public-key or --jwt-jwks)"
            )
        })
    }

    /// A 401's sentence for a token the crate refused.
    fn explain(&self, kind: &ErrorKind) -> String {
        match kind {
            ErrorKind::ExpiredSignature => format!(
                "the token has expired (its exp is more than {LEEWAY_SECS} s in the past); get a new token"
            ),
            ErrorKind::ImmatureSignature => format!(
                "the token is not valid yet (its nbf is more than {LEEWAY_SECS} s in the future); \
                 check the clocks of its issuer and this server"
            ),
            ErrorKind::InvalidAudience => format!(
                "the token's aud does not include {:?}, this server's audience (--jwt-audience)",
                self.settings.audience.as_deref().unwrap_or("")
            ),
            ErrorKind::InvalidIssuer => format!(
                "the token's iss is not {:?}, this server's issuer (--jwt-issuer)",
                self.settings.issuer.as_deref().unwrap_or("")
            ),
            ErrorKind::MissingRequiredClaim(claim) => format!(
                "the token has no {claim} claim; this server requires exp and sub{}{}",
                if self.settings.audience.is_some() { ", aud" } else { "" },
                if self.settings.issuer.is_some() { ", iss" } else { "" },
            ),
            ErrorKind::InvalidClaimFormat(claim) => {
                format!("the token's {claim} claim has the wrong type (exp and nbf are numbers of seconds)")
            }
            ErrorKind::InvalidSignature => {
                "the token's signature does not verify with the server's key: it was signed with \
                 another key, or altered"
                    .to_owned()
            }
            ErrorKind::InvalidAlgorithm => {
                "the token's alg does not go with the server's key for it".to_owned()
            }
            _ => "the token is not a valid JWT (header.claims.signature, each base64url)".to_owned(),
        }
    }
}

/// The owner of what a JWT opens: `iss` and `sub`, hashed (with a label of its own, so it
/// is never a token file's owner), so a renewed token of the same subject is the same owner.
fn owner_of(issuer: Option<&str>, subject: &str) -> Owner {
    let mut hasher = Sha256::new();
    hasher.update(b"bus jwt owner\0");
    hasher.update(issuer.unwrap_or("").as_bytes());
    hasher.update(b"\0");
    hasher.update(subject.as_bytes());
    let fingerprint: String = hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Owner(fingerprint)
}

/// Whether `token` has the shape of a JWT: three non-empty base64url parts.
pub fn looks_like_jwt(token: &str) -> bool {
    let base64url = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = token.split('.');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(a), Some(b), Some(c), None) if base64url(a) && base64url(b) && base64url(c)
    )
}

/// The least length of an HS256 secret: 256 bits, the size of its hash.
const MIN_SECRET_LEN: usize = 32;

fn load_secret(path: &Path) -> Result<DecodingKey, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("--jwt-secret-file {}: {e}", path.display()))?;
    let secret = bytes.trim_ascii();
    if secret.len() < MIN_SECRET_LEN {
        return Err(format!(
            "--jwt-secret-file {}: the secret is {} bytes; HS256 needs at least {MIN_SECRET_LEN} \
             (e.g. `openssl rand -hex 32`)",
            path.display(),
            secret.len()
        ));
    }
    DecodingKey::from_secret(secret)
        .map_err(|e| format!("--jwt-secret-file {}: {e}", path.display()))
}

/// The algorithms an EC point's curve takes: 65 bytes uncompressed is P-256, 97 P-384.
fn ec_algorithms(point_len: usize) -> Option<Vec<Algorithm>> {
    match point_len {
        65 => Some(vec![Algorithm::ES256]),
        97 => Some(vec![Algorithm::ES384]),
        _ => None,
    }
}

fn load_public_key(path: &Path) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let failed = |what: &str| format!("--jwt-public-key {}: {what}", path.display());
    let text = std::fs::read(path).map_err(|e| failed(&e.to_string()))?;
    if text.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(failed(
            "this is a private key; the server needs only the public key (openssl pkey -pubout)",
        ));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(&text) {
        return Ok((key, AlgorithmFamily::Rsa.algorithms().to_vec()));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&text) {
        let point = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
        let algorithms = ec_algorithms(point)
            .ok_or_else(|| failed("an EC key of a curve other than P-256 or P-384"))?;
        return Ok((key, algorithms));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&text) {
        if key.try_get_as_bytes().map(<[u8]>::len) != Ok(32) {
            return Err(failed("an EdDSA key that is not Ed25519"));
        }
        return Ok((key, vec![Algorithm::EdDSA]));
    }
    Err(failed(
        "not a PEM public key (-----BEGIN PUBLIC KEY-----) of RSA, EC P-256/P-384 or Ed25519",
    ))
}

type JwksKey = (Option<String>, DecodingKey, Vec<Algorithm>);

fn load_jwks(path: &Path) -> Result<Vec<JwksKey>, String> {
    let failed = |what: String| format!("--jwt-jwks {}: {what}", path.display());
    let text = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| failed(format!("not a JWKS ({{\"keys\":[…]}}): {e}")))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue; // for encryption, not signatures
        }
        let name = match &jwk.common.key_id {
            Some(kid) => format!("key {kid:?}"),
            None => format!("key {}", i + 1),
        };
        let by_type = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa.algorithms().to_vec(),
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => {
                    return Err(failed(format!(
                        "{name}: only the EC curves P-256 and P-384 are supported"
                    )))
                }
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(failed(format!(
                    "{name} is a shared secret (kty oct); a JWKS here holds public keys only, \
                     put an HS256 secret in --jwt-secret-file"
                )))
            }
            _ => {
                return Err(failed(format!(
                    "{name}: a key type the server does not verify with (RSA, EC, Ed25519)"
                )))
            }
        };
        // A key that names its algorithm takes only that one (of its type).
        let algorithms = match jwk.common.key_algorithm.map(Algorithm::try_from) {
            None => by_type,
            Some(Ok(algorithm)) if by_type.contains(&algorithm) => vec![algorithm],
            Some(_) => {
                return Err(failed(format!(
                    "{name}: its alg does not go with its key type (which takes {})",
                    names(&by_type)
                )))
            }
        };
        let decoding = DecodingKey::from_jwk(jwk).map_err(|e| failed(format!("{name}: {e}")))?;
        let usable = match algorithms[0].family() {
            AlgorithmFamily::Ec => decoding
                .try_get_as_bytes()
                .is_ok_and(|point| ec_algorithms(point.len()) == Some(algorithms.clone())),
            AlgorithmFamily::Ed => decoding.try_get_as_bytes().is_ok_and(|x| x.len() == 32),
            _ => true,
        };
        if !usable {
            return Err(failed(format!(
                "{name}: its coordinates do not fit its curve"
            )));
        }
        keys.push((jwk.common.key_id.clone(), decoding, algorithms));
    }
    if keys.is_empty() {
        return Err(failed("no signing keys".into()));
    }
    if keys.len() > 1 && keys.iter().any(|(kid, _, _)| kid.is_none()) {
        return Err(failed(
            "with several keys, every key needs a kid (tokens name theirs in the header)".into(),
        ));
    }
    Ok(keys)
}
