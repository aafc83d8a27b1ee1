//! Values written as text in a config file: durations and sizes.
//!
//! Owns how they are read and how they are written back, so that a default serialized here
//! reads as an operator would write it (`"500ms"`, `"64MiB"`) and parses to the same value.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as text: `"2s"`, `"500ms"`, `"1m 30s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Duration(pub std::time::Duration);

impl Duration {
    pub(crate) const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    pub(crate) const fn from_millis(millis: u64) -> Self {
        Self(std::time::Duration::from_millis(millis))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(text.trim())
            .map(Duration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write it like \"30s\" or \"500ms\""
                ))
            })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // humantime writes the largest units first ("5m", "1m 30s", "250ms") and reads its own
        // output back exactly.
        s.collect_str(&humantime::format_duration(self.0))
    }
}

/// `buffer.root_grace`: `"auto"` (learned from arrival) or a fixed duration (`"2s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grace {
    Auto,
    Fixed(Duration),
}

impl<'de> Deserialize<'de> for Grace {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "auto" {
            return Ok(Grace::Auto);
        }
        humantime::parse_duration(text.trim())
            .map(|d| Grace::Fixed(Duration(d)))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid grace {text:?} ({e}); write \"auto\", or a duration like \"2s\""
                ))
            })
    }
}

impl Serialize for Grace {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Grace::Auto => s.serialize_str("auto"),
            Grace::Fixed(d) => d.serialize(s),
        }
    }
}

/// A size written as text (`"512MiB"`, `"64 MB"`) or as a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size(pub u64);

impl Size {
    pub(crate) fn bytes(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|s| Size(s.as_u64()))
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "invalid size {text:?} ({e}); write it like \"512MiB\" or \"64KB\""
                    ))
                }),
        }
    }
}

impl Serialize for Size {
    /// The largest binary unit that divides the size exactly (`"16MiB"`), else plain bytes:
    /// never a rounded `"1.5 MiB"` that would read back as a different number.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        match UNITS
            .iter()
            .find(|(unit, _)| self.0 != 0 && self.0.is_multiple_of(*unit))
        {
            Some((unit, name)) => s.collect_str(&format_args!("{}{name}", self.0 / unit)),
            None => s.serialize_u64(self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grace_is_auto_or_a_duration() {
        for (text, want) in [
            ("auto", Grace::Auto),
            ("2s", Grace::Fixed(Duration::from_secs(2))),
            ("1500ms", Grace::Fixed(Duration::from_millis(1500))),
        ] {
            let g: Grace = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(g, want);
            let back: Grace = serde_json::from_value(serde_json::to_value(g).unwrap()).unwrap();
            assert_eq!(back, want);
        }
        let err = serde_json::from_value::<Grace>(serde_json::json!("soon")).unwrap_err();
        assert!(err.to_string().contains("\"auto\""), "{err}");
    }

    #[test]
    fn written_forms_read_back_as_the_same_value() {
        for ms in [0, 1, 250, 1000, 1500, 60_000, 90_000, 300_000, 86_400_000] {
            let d = Duration::from_millis(ms);
            let text = serde_json::to_value(d).unwrap();
            let back: Duration = serde_json::from_value(text.clone()).unwrap();
            assert_eq!(back, d, "{text}");
        }
        assert_eq!(
            serde_json::to_value(Duration::from_secs(300)).unwrap(),
            "5m"
        );
        for n in [
            0,
            1,
            1000,
            1024,
            4096 + 1,
            16 << 20,
            3 << 30,
            (1 << 20) + 512,
        ] {
            let size = Size(n);
            let text = serde_json::to_value(size).unwrap();
            let back: Size = serde_json::from_value(text.clone()).unwrap();
            assert_eq!(back, size, "{text}");
        }
        assert_eq!(serde_json::to_value(Size(64 << 20)).unwrap(), "64MiB");
        assert_eq!(serde_json::to_value(Size(1000)).unwrap(), 1000);
    }
}
