//! The connection library that runs inside the iOS push provider extension (see issue
//! "mobile-sdk"). Not built yet: this crate reserves its place in the workspace.
