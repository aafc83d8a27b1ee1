//! Where a key is written: the config text parsed once more with toml's spans, so an error
//! found after parsing (a value out of range, a policy name used twice) points at the line of
//! the key at fault, in the right `[[policies]]` entry.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// A parsed config text that answers "on which line is this key?".
pub(super) struct KeyLines<'t> {
    text: &'t str,
    root: Spanned<DeTable<'t>>,
}

impl<'t> KeyLines<'t> {
    pub(super) fn parse(text: &'t str) -> Result<Self, toml::de::Error> {
        Ok(Self {
            text,
            root: DeTable::parse(text)?,
        })
    }

    /// The line of `key`, a dotted path whose parts may carry an array index
    /// (`policies[2].timeout`). A key that is not written (it took its default) falls back to
    /// the nearest written key above it: the entry, then the section.
    pub(super) fn line_of(&self, key: &str) -> Option<usize> {
        let mut table = self.root.get_ref();
        let mut found = None;
        for part in key.split('.') {
            let (name, index) = split_index(part);
            let Some((k, v)) = table.get_key_value(name) else {
                break;
            };
            found = Some(k.span().start);
            let mut value = v;
            if let Some(i) = index {
                let Some(item) = value.get_ref().as_array().and_then(|a| a.get(i)) else {
                    break;
                };
                found = Some(item.span().start);
                value = item;
            }
            match value.get_ref() {
                DeValue::Table(t) => table = t,
                _ => break,
            }
        }
        found.map(|offset| self.line_at(offset))
    }

    /// The keys written directly in the table at `section`, with their lines.
    pub(super) fn keys_in(&self, section: &str) -> Vec<(String, usize)> {
        let Some(DeValue::Table(table)) = self.root.get_ref().get(section).map(Spanned::get_ref)
        else {
            return Vec::new();
        };
        table
            .iter()
            .map(|(k, _)| (k.get_ref().to_string(), self.line_at(k.span().start)))
            .collect()
    }

    /// The string written at `section.key`, if that is a string.
    pub(super) fn str_at(&self, section: &str, key: &str) -> Option<&str> {
        self.root
            .get_ref()
            .get(section)?
            .get_ref()
            .as_table()?
            .get(key)?
            .get_ref()
            .as_str()
    }

    fn line_at(&self, offset: usize) -> usize {
        let before = self.text.get(..offset).unwrap_or(self.text);
        before.matches('\n').count() + 1
    }
}

/// `policies[2]` → (`policies`, Some(2)); `buffer` → (`buffer`, None).
fn split_index(part: &str) -> (&str, Option<usize>) {
    if let Some((name, rest)) = part.split_once('[')
        && let Some(index) = rest.strip_suffix(']').and_then(|i| i.parse().ok())
    {
        return (name, Some(index));
    }
    (part, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
[buffer]
root_grace = \"1s\"

[[policies]]
name = \"a\"
plugin = \"keep-errors\"

[[policies]]
name = \"b\"
plugin = \"latency\"
timeout = \"0s\"
[policies.config]
threshold_ms = 5
";

    #[test]
    fn finds_keys_in_the_right_array_entry() {
        let lines = KeyLines::parse(TEXT).unwrap();
        assert_eq!(lines.line_of("buffer.root_grace"), Some(2));
        assert_eq!(lines.line_of("policies[0].name"), Some(5));
        assert_eq!(lines.line_of("policies[1].name"), Some(9));
        assert_eq!(lines.line_of("policies[1].timeout"), Some(11));
        assert_eq!(lines.line_of("policies[1].config.threshold_ms"), Some(13));
    }

    #[test]
    fn an_unwritten_key_falls_back_to_what_encloses_it() {
        let lines = KeyLines::parse(TEXT).unwrap();
        assert_eq!(lines.line_of("buffer.trace_idle"), Some(1));
        assert_eq!(
            lines.line_of("policies[0].timeout"),
            lines.line_of("policies[0]")
        );
        assert_eq!(lines.line_of("receivers.grpc"), None);
    }
}
