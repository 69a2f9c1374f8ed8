//! The caller's deadline of a gRPC call, from its `grpc-timeout` header (gRPC over HTTP/2:
//! up to 8 ASCII digits and a unit, `H` `M` `S` `m` `u` `n`).
//!
//! Only the RPCs podsnapd serves itself read it: forwarded calls carry the header on to
//! containerd untouched, and containerd applies it.

use std::time::{Duration, Instant};

use http::HeaderMap;

/// The header a gRPC client puts its deadline in.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The caller's deadline of one call, stored in the request's extensions when it arrives;
/// `None` when the caller set none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline(pub Option<Instant>);

/// Why a `grpc-timeout` value is malformed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrpcTimeoutError {
    /// The header is not ASCII digits followed by one unit.
    #[error("grpc-timeout {0:?}: expected 1 to 8 digits and a unit (H, M, S, m, u, n)")]
    Malformed(String),
}

/// Parses a `grpc-timeout` value (`"120S"`, `"500m"`, `"9999999n"`).
pub fn parse_grpc_timeout(value: &str) -> Result<Duration, GrpcTimeoutError> {
    let malformed = || GrpcTimeoutError::Malformed(value.to_string());
    let unit = value.chars().last().ok_or_else(malformed)?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    let amount: u64 = digits.parse().map_err(|_| malformed())?;
    Ok(match unit {
        'H' => Duration::from_secs(amount * 3600),
        'M' => Duration::from_secs(amount * 60),
        'S' => Duration::from_secs(amount),
        'm' => Duration::from_millis(amount),
        'u' => Duration::from_micros(amount),
        'n' => Duration::from_nanos(amount),
        _ => return Err(malformed()),
    })
}

/// The deadline that the `grpc-timeout` header in `headers` sets for a call that arrived at
/// `arrived`. A malformed header counts as no deadline, as tonic and grpc-go servers treat it.
pub fn call_deadline(headers: &HeaderMap, arrived: Instant) -> CallDeadline {
    let Some(value) = headers.get(GRPC_TIMEOUT) else {
        return CallDeadline(None);
    };
    let parsed = value
        .to_str()
        .map_err(|_| GrpcTimeoutError::Malformed(String::from_utf8_lossy(value.as_bytes()).into()))
        .and_then(parse_grpc_timeout);
    match parsed {
        Ok(timeout) => CallDeadline(arrived.checked_add(timeout)),
        Err(err) => {
            tracing::warn!(%err, "ignoring the caller's deadline");
            CallDeadline(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_of_grpc_timeout_parses() {
        assert_eq!(parse_grpc_timeout("2H"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Ok(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("120S"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("500m"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_grpc_timeout("7u"), Ok(Duration::from_micros(7)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Ok(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("0S"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_grpc_timeouts_are_rejected() {
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "123456789S",
            "-1S",
            "1.5S",
            " 1S",
            "1 S",
            "1SS",
            "1é",
        ] {
            assert!(parse_grpc_timeout(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn deadline_is_arrival_plus_timeout_and_absent_or_malformed_means_none() {
        let arrived = Instant::now();
        let mut headers = HeaderMap::new();
        assert_eq!(call_deadline(&headers, arrived), CallDeadline(None));
        headers.insert(GRPC_TIMEOUT, "1500m".parse().unwrap());
        assert_eq!(
            call_deadline(&headers, arrived),
            CallDeadline(Some(arrived + Duration::from_millis(1500)))
        );
        headers.insert(GRPC_TIMEOUT, "soon".parse().unwrap());
        assert_eq!(call_deadline(&headers, arrived), CallDeadline(None));
    }
}
