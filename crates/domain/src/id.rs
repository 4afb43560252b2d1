//! Object identifiers and the distinct set of them a callback names.

use std::fmt;
use std::str::FromStr;

/// The id of an upstream object: a non-negative integer that fits in `i64` (0 is valid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId(i64);

/// Why a raw value is not an [`ObjectId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidObjectId {
    /// The value is below zero.
    #[error("must not be negative, got {0}")]
    Negative(i64),
    /// The value does not fit in a signed 64-bit integer.
    #[error("must fit in a signed 64-bit integer (at most {max})", max = i64::MAX)]
    TooLarge,
    /// The text is not a decimal integer.
    #[error("must be a decimal integer, got {0:?}")]
    NotAnInteger(String),
}

impl ObjectId {
    /// The largest valid id.
    pub const MAX: ObjectId = ObjectId(i64::MAX);

    /// Builds an id from a signed integer, rejecting negative values.
    pub fn new(raw: i64) -> Result<Self, InvalidObjectId> {
        if raw < 0 {
            Err(InvalidObjectId::Negative(raw))
        } else {
            Ok(Self(raw))
        }
    }

    /// The id as the `i64` the database and the upstream use.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for ObjectId {
    type Error = InvalidObjectId;

    fn try_from(raw: i64) -> Result<Self, Self::Error> {
        Self::new(raw)
    }
}

impl TryFrom<u64> for ObjectId {
    type Error = InvalidObjectId;

    fn try_from(raw: u64) -> Result<Self, Self::Error> {
        i64::try_from(raw)
            .map(Self)
            .map_err(|_| InvalidObjectId::TooLarge)
    }
}

impl FromStr for ObjectId {
    type Err = InvalidObjectId;

    /// Parses plain decimal digits only: no sign, no spaces, no exponent.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            if let Some(digits) = s.strip_prefix('-')
                && !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
            {
                return match s.parse::<i64>() {
                    Ok(v) => Err(InvalidObjectId::Negative(v)),
                    Err(_) => Err(InvalidObjectId::TooLarge),
                };
            }
            return Err(InvalidObjectId::NotAnInteger(s.chars().take(64).collect()));
        }
        s.parse::<i64>()
            .map(Self)
            .map_err(|_| InvalidObjectId::TooLarge)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The distinct ids of one callback, in ascending order.
///
/// Sorted rather than hashed: a sort and a pass over a few hundred ids costs less than a
/// hash set of them, and the inbox writes rows in id order anyway (its lock order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DistinctIds(Vec<ObjectId>);

impl DistinctIds {
    /// How many distinct ids there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the callback named no id at all.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ids, each once, ascending.
    pub fn as_slice(&self) -> &[ObjectId] {
        &self.0
    }
}

impl FromIterator<ObjectId> for DistinctIds {
    fn from_iter<I: IntoIterator<Item = ObjectId>>(iter: I) -> Self {
        let mut ids: Vec<ObjectId> = iter.into_iter().collect();
        ids.sort_unstable();
        ids.dedup();
        Self(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_max_are_valid_negative_is_not() {
        assert_eq!(ObjectId::new(0).map(ObjectId::get), Ok(0));
        assert_eq!(ObjectId::new(i64::MAX), Ok(ObjectId::MAX));
        assert_eq!(ObjectId::new(-1), Err(InvalidObjectId::Negative(-1)));
        assert_eq!(
            ObjectId::try_from(i64::MAX as u64 + 1),
            Err(InvalidObjectId::TooLarge)
        );
    }

    #[test]
    fn parses_only_plain_decimal_digits() {
        assert_eq!("42".parse::<ObjectId>().map(ObjectId::get), Ok(42));
        assert_eq!("-3".parse::<ObjectId>(), Err(InvalidObjectId::Negative(-3)));
        assert_eq!(
            "9223372036854775808".parse::<ObjectId>(),
            Err(InvalidObjectId::TooLarge)
        );
        for bad in ["", "+1", "1.0", "1e3", " 1", "abc", "-"] {
            assert!(
                matches!(
                    bad.parse::<ObjectId>(),
                    Err(InvalidObjectId::NotAnInteger(_))
                ),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn distinct_ids_are_ascending_and_each_once() {
        let ids: DistinctIds = [2, 0, 2, 1, 0, 7]
            .into_iter()
            .map(|v| ObjectId::new(v).unwrap())
            .collect();
        let raw: Vec<i64> = ids.as_slice().iter().map(|id| id.get()).collect();
        assert_eq!(raw, vec![0, 1, 2, 7]);
        assert_eq!(ids.len(), 4);
    }
}
