//! Header and string matchers (`HeaderMatcher`, `StringMatcher`, `safe_regex`) shared by
//! routes, retries, virtual clusters, the fault filter and RBAC.

use envoy_types::pb::envoy::config::route::v3 as pb;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use super::FieldError;
use super::compat;

/// A compiled regular expression that compares by its source text.
#[derive(Debug, Clone)]
pub struct Pattern(pub regex_lite::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Pattern {
    /// Compile `re` so that it must match the whole input (Envoy's full-match rule).
    pub fn full(re: &str) -> Result<Pattern, regex_lite::Error> {
        Pattern::search(&format!("^(?:{re})$"))
    }

    /// Compile `re` as given, for searching (rewrites); bounded by
    /// [`super::limits::MAX_REGEX_PROGRAM_BYTES`].
    pub fn search(re: &str) -> Result<Pattern, regex_lite::Error> {
        regex_lite::RegexBuilder::new(re)
            .size_limit(super::limits::MAX_REGEX_PROGRAM_BYTES)
            .build()
            .map(Pattern)
    }
}

/// One `HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatch {
    /// Header name, lowercase (`:method`, `:authority`, `:path` are allowed).
    pub name: String,
    /// How the value is tested.
    pub kind: HeaderMatchKind,
    /// `invert_match`.
    pub invert: bool,
}

/// The value test of a `HeaderMatcher` (also used for query parameters).
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatchKind {
    /// `exact_match` or `string_match.exact`.
    Exact {
        /// Expected value.
        value: String,
        /// `string_match.ignore_case`.
        ignore_case: bool,
    },
    /// `string_match.prefix` / `prefix_match`.
    Prefix(String, bool),
    /// `string_match.suffix` / `suffix_match`.
    Suffix(String, bool),
    /// `string_match.contains` / `contains_match`.
    Contains(String, bool),
    /// `safe_regex_match` / `string_match.safe_regex`: the whole value must match.
    Regex(Pattern),
    /// `present_match`: true = the header is present, false = absent.
    Present(bool),
    /// A matcher skiff does not run; it never matches.
    Unsupported(String),
}

pub(super) fn string_match(m: &matcher::StringMatcher) -> Result<HeaderMatchKind, FieldError> {
    use matcher::string_matcher::MatchPattern as P;
    let ic = m.ignore_case;
    Ok(match &m.match_pattern {
        Some(P::Exact(v)) => HeaderMatchKind::Exact {
            value: v.clone(),
            ignore_case: ic,
        },
        Some(P::Prefix(v)) => HeaderMatchKind::Prefix(v.clone(), ic),
        Some(P::Suffix(v)) => HeaderMatchKind::Suffix(v.clone(), ic),
        Some(P::Contains(v)) => HeaderMatchKind::Contains(v.clone(), ic),
        Some(P::SafeRegex(r)) => HeaderMatchKind::Regex(regex(&r.regex, "safe_regex.regex")?),
        _ => return Err(compat::refuse(compat::F_MATCHER_KIND, "")),
    })
}

pub(super) fn regex(re: &str, field: &str) -> Result<Pattern, FieldError> {
    Pattern::full(re).map_err(|e| FieldError::new(field, format!("invalid regex {re:?}: {e}")))
}

/// Convert one `HeaderMatcher` (routes, retries, virtual clusters, the fault filter).
#[allow(deprecated)]
pub(crate) fn header_match(h: &pb::HeaderMatcher) -> Result<HeaderMatch, FieldError> {
    use pb::header_matcher::HeaderMatchSpecifier as S;
    let kind = match &h.header_match_specifier {
        Some(S::ExactMatch(v)) => HeaderMatchKind::Exact {
            value: v.clone(),
            ignore_case: false,
        },
        Some(S::PrefixMatch(v)) => HeaderMatchKind::Prefix(v.clone(), false),
        Some(S::SuffixMatch(v)) => HeaderMatchKind::Suffix(v.clone(), false),
        Some(S::ContainsMatch(v)) => HeaderMatchKind::Contains(v.clone(), false),
        Some(S::PresentMatch(p)) => HeaderMatchKind::Present(*p),
        Some(S::StringMatch(m)) => string_match(m).map_err(|e| e.within("string_match"))?,
        Some(S::SafeRegexMatch(r)) => {
            HeaderMatchKind::Regex(regex(&r.regex, "safe_regex_match.regex")?)
        }
        Some(S::RangeMatch(_)) => {
            return Err(compat::refuse(compat::F_MATCHER_KIND, "range_match"));
        }
        // No specifier: Envoy treats the matcher as "header present".
        None => HeaderMatchKind::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase(),
        kind,
        invert: h.invert_match,
    })
}
