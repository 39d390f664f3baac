//! The error table: broker errors → transient/permanent.

use distributor_core::Error;

/// A boxed native error.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the adapter or the worker SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The config cannot work (a subject outside the stream, an unreadable nkey file).
    #[error("nats config: {0}")]
    Config(String),
    /// The broker refused the credentials.
    #[error("nats: not authorized: {0}")]
    Unauthorized(String),
    /// The broker cannot be reached (connect failed, or it did not answer in time).
    #[error("nats: cannot connect: {0}")]
    Connect(String),
    /// A request to the broker failed (publish, stream, consumer or bucket operation).
    #[error("nats: {op}: {source}")]
    Broker {
        /// What was being done.
        op: &'static str,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// The payload does not match the `nats` payload type.
    #[error("nats payload: {0}")]
    Payload(#[source] serde_json::Error),
    /// A stored record or message cannot be read.
    #[error("nats: corrupt {what}: {message}")]
    Corrupt {
        /// Which record or message.
        what: String,
        /// Why it cannot be read.
        message: String,
    },
    /// Another delivery took the work over (this worker's lease lapsed), or the work ended:
    /// this worker's writes are refused.
    #[error("nats: the work was taken over or ended: {0}")]
    Superseded(String),
}

impl NatsError {
    /// A broker error while doing `op`.
    pub(crate) fn broker(op: &'static str) -> impl FnOnce(BoxError) -> NatsError {
        move |source| NatsError::Broker { op, source }
    }

    /// Whether the operation may succeed if tried again (the table below).
    ///
    /// | error | class | why |
    /// |---|---|---|
    /// | `Config` | permanent | the config will not fix itself |
    /// | `Unauthorized` | permanent | the credentials will not fix themselves |
    /// | `Connect` | transient | the broker may be restarting |
    /// | `Broker` | transient | timeouts, no responders and leader changes pass |
    /// | `Payload` | permanent | the payload will not change |
    /// | `Corrupt` | permanent | the stored bytes will not change |
    /// | `Superseded` | permanent | another delivery owns the work now |
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Config(_)
            | Self::Unauthorized(_)
            | Self::Payload(_)
            | Self::Corrupt { .. }
            | Self::Superseded(_) => false,
            Self::Connect(_) | Self::Broker { .. } => true,
        }
    }
}

impl From<NatsError> for Error {
    fn from(e: NatsError) -> Self {
        let message = e.to_string();
        if e.is_transient() {
            Error::transient_from(message, e)
        } else {
            Error::permanent_from(message, e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(e: NatsError) -> (bool, bool) {
        let transient = e.is_transient();
        (transient, Error::from(e).is_transient())
    }

    #[test]
    fn config_is_permanent() {
        assert_eq!(classify(NatsError::Config("x".into())), (false, false));
    }

    #[test]
    fn unauthorized_is_permanent() {
        assert_eq!(
            classify(NatsError::Unauthorized("x".into())),
            (false, false)
        );
    }

    #[test]
    fn connect_is_transient() {
        assert_eq!(classify(NatsError::Connect("refused".into())), (true, true));
    }

    #[test]
    fn broker_is_transient() {
        let e = NatsError::broker("publish")("timed out".into());
        assert_eq!(classify(e), (true, true));
    }

    #[test]
    fn payload_is_permanent() {
        let e = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(classify(NatsError::Payload(e)), (false, false));
    }

    #[test]
    fn corrupt_is_permanent() {
        let e = NatsError::Corrupt {
            what: "record".into(),
            message: "not JSON".into(),
        };
        assert_eq!(classify(e), (false, false));
    }

    #[test]
    fn superseded_is_permanent() {
        assert_eq!(classify(NatsError::Superseded("x".into())), (false, false));
    }
}
