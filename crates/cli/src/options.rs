//! `--option key=value` flags, gathered into the `options` map of `CheckpointPod` and
//! `RestorePod`. Which keys exist is the runtime's business (podsnapd rejects unknown ones);
//! here only the syntax is checked, and that no key is given twice.

use std::collections::HashMap;

/// Why `--option` values do not form an options map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("--option {0:?}: expected key=value")]
    NotKeyValue(String),
    #[error("--option {0:?}: the key is empty")]
    EmptyKey(String),
    #[error("--option {key:?} is given twice")]
    Duplicate { key: String },
}

/// The options map of `key=value` strings (the value may contain `=`, and may be empty).
pub fn parse_options(pairs: &[String]) -> Result<HashMap<String, String>, OptionError> {
    let mut options = HashMap::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| OptionError::NotKeyValue(pair.clone()))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(OptionError::EmptyKey(pair.clone()));
        }
        if options.insert(key.to_string(), value.to_string()).is_some() {
            return Err(OptionError::Duplicate {
                key: key.to_string(),
            });
        }
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn key_value_pairs_become_the_options_map() {
        let options = parse_options(&strings(&[
            "podsnap.io/tcp-established=true",
            "podsnap.io/note=a=b",
            "podsnap.io/empty=",
        ]))
        .unwrap();
        assert_eq!(options.len(), 3);
        assert_eq!(options["podsnap.io/tcp-established"], "true");
        assert_eq!(options["podsnap.io/note"], "a=b");
        assert_eq!(options["podsnap.io/empty"], "");
        assert!(parse_options(&[]).unwrap().is_empty());
    }

    #[test]
    fn missing_equals_empty_key_and_duplicates_are_rejected() {
        assert_eq!(
            parse_options(&strings(&["podsnap.io/x"])),
            Err(OptionError::NotKeyValue("podsnap.io/x".into()))
        );
        assert_eq!(
            parse_options(&strings(&["=true"])),
            Err(OptionError::EmptyKey("=true".into()))
        );
        assert_eq!(
            parse_options(&strings(&["k=1", "k=2"])),
            Err(OptionError::Duplicate { key: "k".into() })
        );
    }
}
