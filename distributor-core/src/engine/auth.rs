//! Per-execution notification tokens: HMAC-SHA256 over the execution id and an expiry.
//!
//! Format: `v1.<execution id>.<expiry ms>.<hex mac>`. Verification recomputes the MAC and
//! compares in constant time, so a forged token is indistinguishable from a wrong one by timing.
//!
//! Scope: a token speaks for the one execution whose id it signs, until its expiry; it cannot
//! be used for another execution (that is [`NotificationRejection::WrongExecution`]). Parsing
//! is strict: one spelling per token (`v1`, decimal id and expiry without sign or leading
//! zeros, 64 lowercase hex digits of MAC), so that no two strings are the same token.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::NotificationRejection;
use crate::types::{AuthToken, ExecutionId, Timestamp};

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies notification tokens with the engine's secret.
#[derive(Clone)]
pub(crate) struct Auth {
    /// The MAC keyed once with the secret; each token clones it (keying hashes the secret).
    keyed: HmacSha256,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Auth(..)")
    }
}

impl Auth {
    pub(crate) fn new(secret: Vec<u8>) -> Self {
        Self {
            keyed: HmacSha256::new_from_slice(&secret).expect("HMAC takes keys of any length"),
        }
    }

    fn mac(&self, body: &str) -> HmacSha256 {
        let mut m = self.keyed.clone();
        m.update(body.as_bytes());
        m
    }

    /// A token for `id`, valid until `expiry`.
    pub(crate) fn sign(&self, id: ExecutionId, expiry: Timestamp) -> AuthToken {
        let body = format!("v1.{}.{}", id.0, expiry.0);
        let mac = hex::encode(self.mac(&body).finalize().into_bytes());
        AuthToken(format!("{body}.{mac}"))
    }

    /// Checks that `token` was signed by this engine for `id` and has not expired at `now`.
    pub(crate) fn verify(
        &self,
        token: &str,
        id: ExecutionId,
        now: Timestamp,
    ) -> Result<(), NotificationRejection> {
        let mut parts = token.rsplitn(2, '.');
        let (Some(mac_hex), Some(body)) = (parts.next(), parts.next()) else {
            return Err(NotificationRejection::Forged);
        };
        let lower_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if mac_hex.len() != 64 || !lower_hex(mac_hex) {
            return Err(NotificationRejection::Forged);
        }
        let Ok(mac) = hex::decode(mac_hex) else {
            return Err(NotificationRejection::Forged);
        };
        self.mac(body)
            .verify_slice(&mac)
            .map_err(|_| NotificationRejection::Forged)?;
        let mut fields = body.split('.');
        let (Some("v1"), Some(tid), Some(exp), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(NotificationRejection::Forged);
        };
        let canonical =
            |s: &str| s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
        if !(canonical(tid) && canonical(exp)) {
            return Err(NotificationRejection::Forged);
        }
        let (Ok(tid), Ok(exp)) = (tid.parse::<u64>(), exp.parse::<i64>()) else {
            return Err(NotificationRejection::Forged);
        };
        if tid != id.0 {
            return Err(NotificationRejection::WrongExecution);
        }
        if exp < now.0 {
            return Err(NotificationRejection::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_for_their_execution_and_time() {
        let a = Auth::new(b"secret".to_vec());
        let t = a.sign(ExecutionId(7), Timestamp(1_000));
        assert_eq!(a.verify(&t.0, ExecutionId(7), Timestamp(999)), Ok(()));
        assert_eq!(
            a.verify(&t.0, ExecutionId(8), Timestamp(999)),
            Err(NotificationRejection::WrongExecution)
        );
        assert_eq!(
            a.verify(&t.0, ExecutionId(7), Timestamp(1_001)),
            Err(NotificationRejection::Expired)
        );
        let other = Auth::new(b"other".to_vec()).sign(ExecutionId(7), Timestamp(1_000));
        assert_eq!(
            a.verify(&other.0, ExecutionId(7), Timestamp(0)),
            Err(NotificationRejection::Forged)
        );
        let tampered = t.0.replace("v1.7.", "v1.8.");
        assert_eq!(
            a.verify(&tampered, ExecutionId(8), Timestamp(0)),
            Err(NotificationRejection::Forged)
        );
        // Other spellings of the same token: uppercase MAC, leading zeros, a sign.
        let (body, mac) = t.0.rsplit_once('.').unwrap();
        let re_mac = |b: &str| format!("{b}.{}", hex::encode(a.mac(b).finalize().into_bytes()));
        for other in [
            format!("{body}.{}", mac.to_uppercase()),
            re_mac("v1.07.1000"),
            re_mac("v1.+7.1000"),
            re_mac("v1.7.01000"),
            re_mac("v1.7.+1000"),
        ] {
            assert_ne!(other, t.0);
            assert_eq!(
                a.verify(&other, ExecutionId(7), Timestamp(0)),
                Err(NotificationRejection::Forged),
                "{other}"
            );
        }
        for garbage in ["", ".", "v1", "v1.7.1000.zz", "a.b.c.d.e"] {
            assert_eq!(
                a.verify(garbage, ExecutionId(7), Timestamp(0)),
                Err(NotificationRejection::Forged)
            );
        }
    }
}
