//! NEAppPushProvider integration and the Linux lifecycle host (see issue "nepush-provider").
//! Not built yet: this crate reserves its place in the workspace.
