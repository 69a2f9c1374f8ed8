//! Durations on the command line, as kubectl and crictl write them: `120s`, `2m`, `1m30s`,
//! `500ms`, `1h`; a bare number is seconds.

use std::time::Duration;

/// Why a duration does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("{0:?} is not a duration (e.g. 120s, 2m, 1m30s, 500ms)")]
    Malformed(String),
    #[error("{0:?}: the duration must be longer than zero")]
    Zero(String),
}

/// Parses `text` as a positive duration.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed(text.to_string());
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seconds = text.parse().map_err(|_| malformed())?;
        return positive(Duration::from_secs(seconds), text);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(malformed());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(malformed());
        }
        let amount: u64 = rest[..digits].parse().map_err(|_| malformed())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "h" => amount.checked_mul(3600).map(Duration::from_secs),
            "m" => amount.checked_mul(60).map(Duration::from_secs),
            "s" => Some(Duration::from_secs(amount)),
            "ms" => Some(Duration::from_millis(amount)),
            _ => None,
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(malformed)?;
        rest = &rest[unit_len..];
    }
    positive(total, text)
}

fn positive(duration: Duration, text: &str) -> Result<Duration, DurationError> {
    if duration.is_zero() {
        Err(DurationError::Zero(text.to_string()))
    } else {
        Ok(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_style_durations_parse() {
        assert_eq!(parse_duration("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn malformed_and_zero_durations_are_rejected() {
        for bad in [
            "",
            "s",
            "1x",
            "1.5s",
            "-1s",
            "1 s",
            "m1",
            "1d",
            "99999999999999999999h",
        ] {
            assert!(
                matches!(parse_duration(bad), Err(DurationError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero("0s".into())));
        assert_eq!(parse_duration("0"), Err(DurationError::Zero("0".into())));
    }
}
