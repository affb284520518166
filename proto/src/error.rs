//! The one error type of this crate.

/// Why a text, JSON value or resource could not be turned into protobuf.
///
/// Paths are JSON paths from the value the caller passed (`$` is its root), for example
/// `$.resources[0].filter_chains[1].filters[0].typed_config`.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The text is neither JSON nor YAML.
    #[error("not valid JSON or YAML: {message}")]
    Text {
        /// The parser's message (YAML's, with line and column).
        message: String,
    },
    /// The message type is not in the descriptor pool (only for explicitly requested types;
    /// unknown `@type`s inside `Any` fields are kept opaque instead).
    #[error("{type_name}: message type not in skiff's descriptor pool (at {path})")]
    UnknownType {
        /// Full protobuf name of the type.
        type_name: String,
        /// Where it was requested.
        path: String,
    },
    /// A JSON value does not fit the protobuf field or message it is for.
    #[error("{type_name} at {path}: {message}")]
    Json {
        /// Full name of the message whose field failed.
        type_name: String,
        /// JSON path of the failing value.
        path: String,
        /// What was wrong.
        message: String,
    },
    /// An `Any` object has no usable `"@type"` and the caller gave no default type URL.
    #[error("at {path}: {message}")]
    AnyType {
        /// JSON path of the `Any` object.
        path: String,
        /// What was wrong with `@type`.
        message: String,
    },
    /// Protobuf bytes do not decode as the expected type.
    #[error("{type_name}: cannot decode protobuf bytes: {message}")]
    Decode {
        /// Full protobuf name of the target type.
        type_name: String,
        /// The decoder's message.
        message: String,
    },
    /// A discovery file or config dump does not have the expected shape.
    #[error("at {path}: {message}")]
    Shape {
        /// JSON path of the offending value.
        path: String,
        /// What was expected.
        message: String,
    },
}

impl CodecError {
    pub(crate) fn json(type_name: &str, path: &str, message: impl Into<String>) -> Self {
        CodecError::Json {
            type_name: type_name.to_owned(),
            path: path.to_owned(),
            message: message.into(),
        }
    }

    pub(crate) fn shape(path: &str, message: impl Into<String>) -> Self {
        CodecError::Shape {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}
