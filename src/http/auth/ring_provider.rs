//! The cryptography of `jsonwebtoken`, computed by `ring`.
//!
//! `jsonwebtoken` (from version 10) leaves its signatures to a [`CryptoProvider`] chosen
//! by the application: aws-lc-rs or RustCrypto out of the box. The server already links
//! `ring` for TLS (rustls), so rather than a second crypto stack this module is a
//! provider on `ring`: HMAC (HS256/384/512), RSA PKCS#1 v1.5 and PSS (RS*/PS*, keys of
//! 2048 to 8192 bits), ECDSA P-256/P-384 (ES256/ES384) and Ed25519 (EdDSA). It verifies
//! what the server needs and signs too, for the tests and tools that make tokens.
//!
//! It checks nothing about which algorithm a key may be used with beyond its family:
//! that is decided by the caller's `Validation` (see [`super::jwt`]).

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, EncodingKey};
use ring::rand::SystemRandom;
use ring::signature as ring_sig;
use ring::{digest, hmac};

/// The provider; [`install`] makes it the process's.
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils {
        rsa_pub_components_from_private_key: rsa_components_from_private_key,
        rsa_pub_components_from_public_key: |_| Err(unsupported()),
        ec_pub_components_from_private_key: ec_components_from_private_key,
        ed_pub_components_from_private_key: ed_components_from_private_key,
        compute_digest,
    },
};

/// Makes [`RING_PROVIDER`] the process's provider for `jsonwebtoken`, once; later calls
/// change nothing (no other provider can be installed: the crate's own are not built).
pub fn install() {
    let _ = RING_PROVIDER.install_default();
}

fn unsupported() -> Error {
    ErrorKind::Provider("not supported by the ring provider".into()).into()
}

fn to_signature_error(what: &'static str) -> signature::Error {
    signature::Error::from_source(what)
}

/// A message authentication code or a signature, by algorithm.
enum Verify {
    Hmac(hmac::Key),
    Public(&'static dyn ring_sig::VerificationAlgorithm, DecodingKey),
    Rsa(&'static ring_sig::RsaParameters, DecodingKey),
}

struct RingVerifier {
    algorithm: Algorithm,
    verify: Verify,
}

impl Verifier<Vec<u8>> for RingVerifier {
    fn verify(&self, message: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        let bad = |_| to_signature_error("the signature does not verify");
        match &self.verify {
            Verify::Hmac(key) => hmac::verify(key, message, signature).map_err(bad),
            Verify::Public(algorithm, key) => {
                let bytes = key
                    .try_get_as_bytes()
                    .map_err(|_| to_signature_error("not a public key"))?;
                ring_sig::UnparsedPublicKey::new(*algorithm, bytes)
                    .verify(message, signature)
                    .map_err(bad)
            }
            Verify::Rsa(parameters, key) => match key.kind() {
                // A PEM key: PKCS#1 RSAPublicKey, as ring takes it.
                DecodingKeyKind::SecretOrDer(der) => {
                    ring_sig::UnparsedPublicKey::new(*parameters, der)
                        .verify(message, signature)
                        .map_err(bad)
                }
                // A JWK: modulus and exponent.
                DecodingKeyKind::RsaModulusExponent { n, e } => {
                    ring_sig::RsaPublicKeyComponents { n, e }
                        .verify(parameters, message, signature)
                        .map_err(bad)
                }
            },
        }
    }
}

impl JwtVerifier for RingVerifier {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    // A key is only ever used with an algorithm of its own family: an RSA or EC public
    // key is never taken as an HMAC secret (the "algorithm confusion" attack).
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let verify = match algorithm {
        Algorithm::HS256 => {
            Verify::Hmac(hmac::Key::new(hmac::HMAC_SHA256, key.try_get_as_bytes()?))
        }
        Algorithm::HS384 => {
            Verify::Hmac(hmac::Key::new(hmac::HMAC_SHA384, key.try_get_as_bytes()?))
        }
        Algorithm::HS512 => {
            Verify::Hmac(hmac::Key::new(hmac::HMAC_SHA512, key.try_get_as_bytes()?))
        }
        Algorithm::RS256 => Verify::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA256, key.clone()),
        Algorithm::RS384 => Verify::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA384, key.clone()),
        Algorithm::RS512 => Verify::Rsa(&ring_sig::RSA_PKCS1_2048_8192_SHA512, key.clone()),
        Algorithm::PS256 => Verify::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA256, key.clone()),
        Algorithm::PS384 => Verify::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA384, key.clone()),
        Algorithm::PS512 => Verify::Rsa(&ring_sig::RSA_PSS_2048_8192_SHA512, key.clone()),
        Algorithm::ES256 => Verify::Public(&ring_sig::ECDSA_P256_SHA256_FIXED, key.clone()),
        Algorithm::ES384 => Verify::Public(&ring_sig::ECDSA_P384_SHA384_FIXED, key.clone()),
        Algorithm::EdDSA => Verify::Public(&ring_sig::ED25519, key.clone()),
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(Box::new(RingVerifier {
        algorithm: *algorithm,
        verify,
    }))
}

/// A key to sign with, by algorithm.
enum Sign {
    Hmac(hmac::Key),
    Rsa(&'static dyn ring_sig::RsaEncoding, ring_sig::RsaKeyPair),
    Ecdsa(ring_sig::EcdsaKeyPair),
    Ed25519(ring_sig::Ed25519KeyPair),
}

struct RingSigner {
    algorithm: Algorithm,
    sign: Sign,
}

impl Signer<Vec<u8>> for RingSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let failed = |_| to_signature_error("signing failed");
        match &self.sign {
            Sign::Hmac(key) => Ok(hmac::sign(key, message).as_ref().to_vec()),
            Sign::Rsa(padding, pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(*padding, &SystemRandom::new(), message, &mut signature)
                    .map_err(failed)?;
                Ok(signature)
            }
            Sign::Ecdsa(pair) => Ok(pair
                .sign(&SystemRandom::new(), message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            Sign::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }
}

impl JwtSigner for RingSigner {
    fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    if key.family() != algorithm.family() {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    let bytes = key.as_bytes();
    let rsa = |padding: &'static dyn ring_sig::RsaEncoding| -> Result<Sign, Error> {
        let pair = ring_sig::RsaKeyPair::from_der(bytes)
            .or_else(|_| ring_sig::RsaKeyPair::from_pkcs8(bytes))
            .map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
        Ok(Sign::Rsa(padding, pair))
    };
    let ecdsa = |alg: &'static ring_sig::EcdsaSigningAlgorithm| -> Result<Sign, Error> {
        ring_sig::EcdsaKeyPair::from_pkcs8(alg, bytes, &SystemRandom::new())
            .map(Sign::Ecdsa)
            .map_err(|_| ErrorKind::InvalidEcdsaKey.into())
    };
    let sign = match algorithm {
        Algorithm::HS256 => Sign::Hmac(hmac::Key::new(hmac::HMAC_SHA256, bytes)),
        Algorithm::HS384 => Sign::Hmac(hmac::Key::new(hmac::HMAC_SHA384, bytes)),
        Algorithm::HS512 => Sign::Hmac(hmac::Key::new(hmac::HMAC_SHA512, bytes)),
        Algorithm::RS256 => rsa(&ring_sig::RSA_PKCS1_SHA256)?,
        Algorithm::RS384 => rsa(&ring_sig::RSA_PKCS1_SHA384)?,
        Algorithm::RS512 => rsa(&ring_sig::RSA_PKCS1_SHA512)?,
        Algorithm::PS256 => rsa(&ring_sig::RSA_PSS_SHA256)?,
        Algorithm::PS384 => rsa(&ring_sig::RSA_PSS_SHA384)?,
        Algorithm::PS512 => rsa(&ring_sig::RSA_PSS_SHA512)?,
        Algorithm::ES256 => ecdsa(&ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING)?,
        Algorithm::ES384 => ecdsa(&ring_sig::ECDSA_P384_SHA384_FIXED_SIGNING)?,
        Algorithm::EdDSA => Sign::Ed25519(
            ring_sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(bytes)
                .map_err(|_| ErrorKind::InvalidEddsaKey)?,
        ),
        _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
    };
    Ok(Box::new(RingSigner {
        algorithm: *algorithm,
        sign,
    }))
}

fn rsa_components_from_private_key(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let pair =
        ring_sig::RsaKeyPair::from_der(der).map_err(|e| ErrorKind::InvalidRsaKey(e.to_string()))?;
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    Ok((public.n, public.e))
}

fn ec_components_from_private_key(
    pkcs8: &[u8],
    algorithm: Algorithm,
) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>), Error> {
    let (signing, curve, coordinate_len) = match algorithm {
        Algorithm::ES256 => (
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            EllipticCurve::P256,
            32,
        ),
        Algorithm::ES384 => (
            &ring_sig::ECDSA_P384_SHA384_FIXED_SIGNING,
            EllipticCurve::P384,
            48,
        ),
        _ => return Err(ErrorKind::InvalidEcdsaKey.into()),
    };
    let pair = ring_sig::EcdsaKeyPair::from_pkcs8(signing, pkcs8, &SystemRandom::new())
        .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
    use ring_sig::KeyPair as _;
    // Uncompressed point: 0x04, x, y.
    match pair.public_key().as_ref().split_first() {
        Some((4, xy)) if xy.len() == 2 * coordinate_len => {
            let (x, y) = xy.split_at(coordinate_len);
            Ok((curve, x.to_vec(), y.to_vec()))
        }
        _ => Err(ErrorKind::InvalidEcdsaKey.into()),
    }
}

fn ed_components_from_private_key(pkcs8: &[u8], curve: &EllipticCurve) -> Result<Vec<u8>, Error> {
    if *curve != EllipticCurve::Ed25519 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    use ring_sig::KeyPair as _;
    let pair = ring_sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|_| ErrorKind::InvalidEddsaKey)?;
    Ok(pair.public_key().as_ref().to_vec())
}

fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>, Error> {
    let algorithm = match hash {
        ThumbprintHash::SHA256 => &digest::SHA256,
        ThumbprintHash::SHA384 => &digest::SHA384,
        ThumbprintHash::SHA512 => &digest::SHA512,
        _ => return Err(unsupported()),
    };
    Ok(digest::digest(algorithm, data).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, encode, Header, Validation};
    use serde_json::{json, Value};

    fn roundtrip(algorithm: Algorithm, signing: &EncodingKey, verifying: &DecodingKey) {
        install();
        let claims = json!({"sub": "a", "exp": jsonwebtoken::get_current_timestamp() + 60});
        let token = encode(&Header::new(algorithm), &claims, signing).unwrap();
        let decoded = decode::<Value>(&token, verifying, &Validation::new(algorithm)).unwrap();
        assert_eq!(decoded.claims["sub"], "a");
        // A flipped bit anywhere in the signature fails it.
        let mut forged = token.into_bytes();
        let last = forged.len() - 3;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(decode::<Value>(&forged, verifying, &Validation::new(algorithm)).is_err());
    }

    #[test]
    fn hmac_ecdsa_and_ed25519_sign_and_verify() {
        let secret = b"0123456789abcdef0123456789abcdef";
        roundtrip(
            Algorithm::HS256,
            &EncodingKey::from_secret(secret).unwrap(),
            &DecodingKey::from_secret(secret).unwrap(),
        );
        use ring_sig::KeyPair as _;
        let rng = SystemRandom::new();
        let pkcs8 = ring_sig::EcdsaKeyPair::generate_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let pair = ring_sig::EcdsaKeyPair::from_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        roundtrip(
            Algorithm::ES256,
            &EncodingKey::from_ec_der(pkcs8.as_ref()),
            &DecodingKey::from_ec_der(pair.public_key().as_ref()),
        );
        let pkcs8 = ring_sig::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring_sig::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        roundtrip(
            Algorithm::EdDSA,
            &EncodingKey::from_ed_der(pkcs8.as_ref()),
            &DecodingKey::from_ed_der(pair.public_key().as_ref()),
        );
    }

    #[test]
    fn a_key_is_never_used_outside_its_family() {
        install();
        let key = DecodingKey::from_ed_der(&[7; 32]);
        assert!(new_verifier(&Algorithm::HS256, &key).is_err());
        let secret = DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        assert!(new_verifier(&Algorithm::EdDSA, &secret).is_err());
    }
}
