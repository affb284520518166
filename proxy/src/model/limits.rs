//! Upper bounds on what one resource can make skiff allocate.
//!
//! A control plane is trusted to say what to proxy, not to decide how much memory skiff uses.
//! Most of a resource's cost is proportional to its encoded size (which the gRPC message limit
//! already bounds); these limits stop the rest: fields whose *value* becomes an allocation (a
//! priority is an index into a list of levels, a regex is compiled into a program) and lists
//! large enough to make every later pass (matching, balancing, projection) slow. Each is far
//! above what Istio generates for a large mesh; a resource over a limit is rejected (NACK)
//! with the field and the limit named. docs/compat/hostile.md lists them beside Envoy's.

use super::FieldError;

/// Highest EDS priority level. Envoy's own rule (`LocalityLbEndpoints.priority`, PGV `lte: 128`).
pub const MAX_PRIORITY: u32 = 128;

/// `LocalityLbEndpoints` groups in one `ClusterLoadAssignment`.
pub const MAX_LOCALITIES: usize = 10_000;

/// Endpoints in one `ClusterLoadAssignment`, all localities together (the kernel fast path
/// holds 100k endpoints in total by default).
pub const MAX_ENDPOINTS: usize = 100_000;

/// Filter chains of one listener (Istio's virtualInbound has one per port and protocol).
pub const MAX_FILTER_CHAINS: usize = 10_000;

/// Virtual hosts of one route configuration.
pub const MAX_VIRTUAL_HOSTS: usize = 10_000;

/// Routes of one route configuration, all virtual hosts together.
pub const MAX_ROUTES: usize = 100_000;

/// Header (or query parameter) matchers of one route match.
pub const MAX_MATCHERS: usize = 256;

/// Compiled size of one regex program (bytes, as `regex_lite` counts them). regex_lite's own
/// default is 10 MiB per regex; Envoy bounds RE2's program size (100 by default, a count of
/// instructions, not bytes). 64 KiB keeps every regex Istio writes and stops a few hundred
/// routes from compiling gigabytes.
pub const MAX_REGEX_PROGRAM_BYTES: usize = 64 * 1024;

/// Rejects `len` items in `field` when more than `max`.
pub fn at_most(field: &str, len: usize, max: usize) -> Result<(), FieldError> {
    if len > max {
        return Err(FieldError::new(
            field,
            format!("{len} entries, more than the limit of {max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_names_field_and_limit() {
        assert!(at_most("endpoints", 3, 3).is_ok());
        let e = at_most("endpoints", 4, 3).unwrap_err();
        assert_eq!(e.field, "endpoints");
        assert!(e.reason.contains("limit of 3"), "{}", e.reason);
    }

    #[test]
    fn regex_programs_are_bounded() {
        use crate::model::matchers::Pattern;
        assert!(Pattern::full(r"[a-z0-9-]+\.svc\.cluster\.local(:\d+)?").is_ok());
        assert!(Pattern::full("/api/v[0-9]+/.*").is_ok());
        // Small text, large program: each counted repetition is compiled out.
        assert!(Pattern::full("a{20000}").is_err());
        assert!(Pattern::search("(a{1000}){1000}").is_err());
    }
}
