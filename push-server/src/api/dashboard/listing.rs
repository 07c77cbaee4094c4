//! The device list behind the dashboard's table: filtered, searched, sorted and paged on the
//! server, so a browser holds one page of rows whatever the site's size; and the batches of
//! changed devices its live stream sends instead of a row per event.

use std::{
    cmp::Ordering,
    collections::{BTreeSet, HashMap},
};

use serde::{Deserialize, Serialize};

use crate::hub::DeviceView;

/// Rows per page when the query names none.
pub(crate) const DEFAULT_LIMIT: usize = 50;
/// Most rows a page may ask for.
pub(crate) const MAX_LIMIT: usize = 500;
/// Longest search text accepted.
pub(crate) const MAX_QUERY: usize = 256;
/// Most device ids one `changed` event lists; beyond that it says "many".
pub(crate) const MAX_CHANGED_IDS: usize = 100;

/// One row of the device table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceRow {
    pub(super) device_id: String,
    pub(super) groups: Vec<String>,
    pub(super) online: bool,
    pub(super) revoked: bool,
    pub(super) ssid: String,
    pub(super) node: String,
    pub(super) session_started_ms: Option<i64>,
    pub(super) last_seen_ms: i64,
    pub(super) last_heard_ms: i64,
    pub(super) sdk_version: String,
    pub(super) instance_id: String,
    pub(super) last_stop_reason: String,
    pub(super) last_call_path: String,
    pub(super) last_call_state: String,
    pub(super) queued: usize,
    pub(super) voip_token: &'static str,
    pub(super) heartbeat_misses: u32,
    pub(super) instance_changes: u32,
    /// The CA generation its enrollment pinned (with the next one).
    pub(super) ca_generation: u32,
    pub(super) flags: Vec<&'static str>,
    /// Why iOS last stopped its provider (Apple's `NEProviderStopReason` name), if it said.
    pub(super) last_provider_stop_reason: &'static str,
    /// Its last session ended because it left the Wi-Fi.
    pub(super) left_wifi: bool,
    /// The worst problem (see [`problem`]), empty when none.
    pub(super) problem: &'static str,
}

/// The worst problem of a device, worst first: a raised flag (`heartbeat_silent`,
/// `needs_re-enrollment`: two CA rotations behind, it cannot connect; `instance_churn`), then `offline_expected` (not revoked, offline while other devices are
/// online on the SSID it was last on: the site works, this phone is not on it); empty if none.
pub(crate) fn problem(flags: &[&'static str], online: bool, revoked: bool, site_up: bool) -> &'static str {
    if let Some(worst) = ["heartbeat_silent", "needs_re-enrollment", "instance_churn"]
        .into_iter()
        .find(|f| flags.contains(f))
    {
        return worst;
    }
    if !online && !revoked && site_up {
        return "offline_expected";
    }
    ""
}

/// How bad a problem is (higher is worse), for sorting.
fn problem_rank(problem: &str) -> u8 {
    match problem {
        "heartbeat_silent" => 4,
        "needs_re-enrollment" => 3,
        "instance_churn" => 2,
        "offline_expected" => 1,
        _ => 0,
    }
}

/// Which devices a page shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateFilter {
    /// Every device.
    #[default]
    #[serde(alias = "")]
    All,
    /// Devices with a live session.
    Online,
    /// Devices without one (revoked ones included).
    Offline,
    /// Devices with a raised flag.
    Flagged,
    /// Devices with any problem (a flag, or offline while expected).
    Problems,
    /// Revoked devices.
    Revoked,
}

/// The column a page is sorted by; ties are broken by device id (`desc` reverses both).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SortKey {
    /// Device id.
    #[default]
    #[serde(alias = "")]
    Device,
    /// Online, then offline, then revoked.
    State,
    /// SSID of the last session.
    Ssid,
    /// Node holding the session.
    Node,
    /// Age of the live session, youngest first; offline devices last.
    Session,
    /// Time since last heard (online) or last seen (offline), most recent first.
    Heard,
    /// SDK version.
    Sdk,
    /// Last stop reason.
    Reason,
    /// Pushes queued, fewest first.
    Queued,
    /// Worst problem first (flags, then offline while expected).
    Problems,
}

/// `GET /api/devices` query: `?q=&state=&ssid=&sort=&desc=&offset=&limit=`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Text searched (case-insensitively for ASCII) in the id, groups, SSID, node, SDK version
    /// and last stop reason.
    pub q: String,
    /// Which devices.
    pub state: StateFilter,
    /// Only devices last on this SSID (empty: any).
    pub ssid: String,
    /// Sort column.
    pub sort: SortKey,
    /// Reverse the order.
    pub desc: bool,
    /// Rows to skip.
    pub offset: usize,
    /// Rows to return (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]).
    pub limit: Option<usize>,
}

impl ListQuery {
    /// Refuse what no page can answer.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.q.len() > MAX_QUERY {
            return Err(format!("q is longer than {MAX_QUERY} bytes"));
        }
        if self.limit == Some(0) || self.limit.is_some_and(|l| l > MAX_LIMIT) {
            return Err(format!("limit must be 1 to {MAX_LIMIT}"));
        }
        Ok(())
    }
}

/// Totals over every device, whatever the page shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Counts {
    /// Devices registered.
    pub total: usize,
    /// Devices online.
    pub online: usize,
    /// Pushes queued.
    pub queued: usize,
    /// Devices with a raised flag.
    pub flagged: usize,
    /// Devices with any problem.
    pub problems: usize,
}

impl Counts {
    /// The totals over every device: `views`, the devices `flagged` (by id, with their flags)
    /// and the devices online per SSID.
    pub(crate) fn of(
        views: &[DeviceView],
        flagged: &HashMap<String, Vec<&'static str>>,
        online_by_ssid: &HashMap<String, usize>,
    ) -> Self {
        let mut counts = Self {
            total: views.len(),
            ..Self::default()
        };
        for v in views {
            let flags = flagged.get(&v.record.device_id).map_or(&[][..], |f| &f[..]);
            counts.online += usize::from(v.online);
            counts.queued += v.queued;
            counts.flagged += usize::from(!flags.is_empty());
            let site_up = site_up(online_by_ssid, &v.record.last_ssid);
            counts.problems += usize::from(!problem(flags, v.online, v.record.revoked, site_up).is_empty());
        }
        counts
    }
}

/// Devices online per SSID.
pub(crate) fn online_by_ssid(views: &[DeviceView]) -> HashMap<String, usize> {
    let mut online: HashMap<String, usize> = HashMap::new();
    for v in views.iter().filter(|v| v.online) {
        *online.entry(v.record.last_ssid.clone()).or_default() += 1;
    }
    online
}

/// Whether devices are online on `ssid`.
pub(crate) fn site_up(online_by_ssid: &HashMap<String, usize>, ssid: &str) -> bool {
    online_by_ssid.get(ssid).is_some_and(|n| *n > 0)
}

/// One page of the device table.
#[derive(Debug, Serialize)]
pub(crate) struct DevicePage {
    /// Unix ms the page was made.
    pub now_ms: i64,
    /// Totals over every device.
    pub counts: Counts,
    /// Devices matching the filter and search.
    pub matched: usize,
    /// Index of the first row in the matching devices.
    pub offset: usize,
    /// The page size asked for.
    pub limit: usize,
    /// The rows.
    pub rows: Vec<DeviceRow>,
}

/// Whether `hay` contains `needle`, ignoring ASCII case (`needle` already lowercase); `buf`
/// is scratch space, reused so a search of every device allocates once.
fn contains_ci(buf: &mut String, hay: &str, needle: &str) -> bool {
    buf.clear();
    buf.push_str(hay);
    buf.make_ascii_lowercase();
    buf.contains(needle)
}

impl ListQuery {
    /// The search text as matched: trimmed, ASCII-lowercase.
    pub(crate) fn needle(&self) -> String {
        self.q.trim().to_ascii_lowercase()
    }

    /// Whether device `v` (shown on `node`) passes the SSID filter and the search (`needle`
    /// from [`Self::needle`]: in the id, SSID, node, SDK version, last stop reason and groups).
    /// Only the devices it finds become rows, so a search of 10,000 devices builds a few.
    pub(crate) fn finds(&self, needle: &str, v: &DeviceView, node: &str, buf: &mut String) -> bool {
        let r = &v.record;
        (self.ssid.is_empty() || r.last_ssid == self.ssid)
            && (needle.is_empty()
                || [
                    &r.device_id,
                    &r.last_ssid,
                    node,
                    &r.sdk_version,
                    &r.last_disconnect_reason,
                ]
                .into_iter()
                .chain(r.groups.iter().map(String::as_str))
                .any(|f| contains_ci(buf, f, needle)))
    }
}

fn shows(r: &DeviceRow, query: &ListQuery) -> bool {
    match query.state {
        StateFilter::All => true,
        StateFilter::Online => r.online,
        StateFilter::Offline => !r.online,
        StateFilter::Flagged => !r.flags.is_empty(),
        StateFilter::Problems => !r.problem.is_empty(),
        StateFilter::Revoked => r.revoked,
    }
}

/// Online 0, offline 1, revoked 2.
fn state_rank(r: &DeviceRow) -> u8 {
    match (r.revoked, r.online) {
        (true, _) => 2,
        (false, true) => 0,
        (false, false) => 1,
    }
}

fn compare(a: &DeviceRow, b: &DeviceRow, key: SortKey, now: i64) -> Ordering {
    // Ages: how long ago, smallest first; no session sorts after every session.
    let session_age = |r: &DeviceRow| r.session_started_ms.map_or(i64::MAX, |t| now - t);
    let heard_age = |r: &DeviceRow| now - if r.online { r.last_heard_ms } else { r.last_seen_ms };
    match key {
        SortKey::Device => Ordering::Equal,
        SortKey::State => state_rank(a).cmp(&state_rank(b)),
        SortKey::Ssid => a.ssid.cmp(&b.ssid),
        SortKey::Node => a.node.cmp(&b.node),
        SortKey::Session => session_age(a).cmp(&session_age(b)),
        SortKey::Heard => heard_age(a).cmp(&heard_age(b)),
        SortKey::Sdk => a.sdk_version.cmp(&b.sdk_version),
        SortKey::Reason => a.last_stop_reason.cmp(&b.last_stop_reason),
        SortKey::Queued => a.queued.cmp(&b.queued),
        SortKey::Problems => problem_rank(b.problem).cmp(&problem_rank(a.problem)),
    }
}

/// The page that `query` asks for of `rows`: the devices it [finds](ListQuery::finds), each
/// with its problem set; `counts` are over every device.
pub(crate) fn page(rows: Vec<DeviceRow>, counts: Counts, query: &ListQuery, now: i64) -> DevicePage {
    let mut found: Vec<DeviceRow> = rows.into_iter().filter(|r| shows(r, query)).collect();
    found.sort_unstable_by(|a, b| {
        let order = compare(a, b, query.sort, now).then_with(|| a.device_id.cmp(&b.device_id));
        if query.desc { order.reverse() } else { order }
    });
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    let matched = found.len();
    let offset = query.offset.min(matched);
    found.truncate(offset.saturating_add(limit));
    DevicePage {
        now_ms: now,
        counts,
        matched,
        offset,
        limit,
        rows: found.split_off(offset),
    }
}

/// What changed since the live stream last told the page: the devices (at most
/// [`MAX_CHANGED_IDS`], else "many") and whether the overview did (a diagnosis). The page
/// refetches what it shows when a change concerns it, so a burst of events costs one small
/// event per flush instead of a row per event.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    ids: BTreeSet<String>,
    many: bool,
    overview: bool,
}

/// The `changed` event's body.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Changed {
    /// The devices that changed; empty when `many`.
    pub ids: Vec<String>,
    /// More devices changed than are listed: the page refetches whatever it shows.
    pub many: bool,
    /// The overview (sites, diagnoses) changed.
    pub overview: bool,
}

impl Changes {
    /// A device changed.
    pub(crate) fn device(&mut self, id: &str) {
        if self.many || self.ids.contains(id) {
            return;
        }
        if self.ids.len() == MAX_CHANGED_IDS {
            self.ids.clear();
            self.many = true;
        } else {
            self.ids.insert(id.to_string());
        }
    }

    /// Events were missed: everything may have changed.
    pub(crate) fn everything(&mut self) {
        self.ids.clear();
        self.many = true;
        self.overview = true;
    }

    /// The overview changed.
    pub(crate) fn overview(&mut self) {
        self.overview = true;
    }

    /// The event for what changed since the last call, if anything did.
    pub(crate) fn take(&mut self) -> Option<Changed> {
        if self.ids.is_empty() && !self.many && !self.overview {
            return None;
        }
        let taken = std::mem::take(self);
        Some(Changed {
            ids: taken.ids.into_iter().collect(),
            many: taken.many,
            overview: taken.overview,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn row(id: &str) -> DeviceRow {
        DeviceRow {
            device_id: id.into(),
            groups: vec!["ward:4B".into()],
            online: false,
            revoked: false,
            ssid: "Ward 4B".into(),
            node: "n1".into(),
            session_started_ms: None,
            last_seen_ms: NOW - 60_000,
            last_heard_ms: 0,
            sdk_version: "lpush-sdk/0.3.1".into(),
            instance_id: String::new(),
            last_stop_reason: String::new(),
            last_call_path: String::new(),
            last_call_state: String::new(),
            queued: 0,
            voip_token: "none",
            heartbeat_misses: 0,
            instance_changes: 0,
            ca_generation: 0,
            flags: Vec::new(),
            last_provider_stop_reason: "",
            left_wifi: false,
            problem: "",
        }
    }

    fn online(id: &str, started: i64) -> DeviceRow {
        DeviceRow {
            online: true,
            session_started_ms: Some(started),
            last_heard_ms: started,
            ..row(id)
        }
    }

    fn ids(page: &DevicePage) -> Vec<&str> {
        page.rows.iter().map(|r| r.device_id.as_str()).collect()
    }

    fn query(f: impl FnOnce(&mut ListQuery)) -> ListQuery {
        let mut q = ListQuery::default();
        f(&mut q);
        q
    }

    #[test]
    fn problems_are_ranked_flags_first() {
        assert_eq!(
            problem(&["instance_churn", "heartbeat_silent"], true, false, true),
            "heartbeat_silent"
        );
        assert_eq!(problem(&["instance_churn"], false, false, true), "instance_churn");
        assert_eq!(problem(&[], false, false, true), "offline_expected");
        // Offline on a site where nobody is online, online, or revoked: no problem.
        assert_eq!(problem(&[], false, false, false), "");
        assert_eq!(problem(&[], true, false, true), "");
        assert_eq!(problem(&[], false, true, true), "");
    }

    #[test]
    fn pages_are_sorted_then_sliced() {
        let rows: Vec<DeviceRow> = (0..120).map(|i| row(&format!("p{i:03}"))).collect();
        let first = page(rows.clone(), Counts::default(), &ListQuery::default(), NOW);
        assert_eq!((first.matched, first.rows.len(), first.offset), (120, 50, 0));
        assert_eq!(ids(&first)[..2], ["p000", "p001"]);
        let last = page(rows.clone(), Counts::default(), &query(|q| q.offset = 100), NOW);
        assert_eq!(
            ids(&last),
            (100..120).map(|i| format!("p{i:03}")).collect::<Vec<_>>()
        );
        let reversed = page(
            rows.clone(),
            Counts::default(),
            &query(|q| (q.desc, q.limit) = (true, Some(2))),
            NOW,
        );
        assert_eq!(ids(&reversed), ["p119", "p118"]);
        // Past the end: empty, offset clamped.
        let beyond = page(rows, Counts::default(), &query(|q| q.offset = 5000), NOW);
        assert_eq!((beyond.rows.len(), beyond.offset), (0, 120));
    }

    #[test]
    fn problems_and_online_devices_sort_to_the_top() {
        let mut silent = row("z-silent");
        silent.flags = vec!["heartbeat_silent"];
        silent.problem = "heartbeat_silent";
        let mut missing = row("m-missing");
        missing.problem = "offline_expected";
        let rows = vec![row("a-fine"), missing, online("b-online", NOW - 5000), silent];
        let by_problem = page(
            rows.clone(),
            Counts::default(),
            &query(|q| q.sort = SortKey::Problems),
            NOW,
        );
        assert_eq!(ids(&by_problem), ["z-silent", "m-missing", "a-fine", "b-online"]);
        let by_state = page(
            rows.clone(),
            Counts::default(),
            &query(|q| q.sort = SortKey::State),
            NOW,
        );
        assert_eq!(ids(&by_state)[0], "b-online");
        let only = page(
            rows,
            Counts::default(),
            &query(|q| q.state = StateFilter::Problems),
            NOW,
        );
        assert_eq!(ids(&only), ["m-missing", "z-silent"]);
    }

    #[test]
    fn session_age_sorts_youngest_first_and_offline_last() {
        let rows = vec![
            row("off"),
            online("old", NOW - 90_000),
            online("new", NOW - 1_000),
        ];
        let p = page(
            rows,
            Counts::default(),
            &query(|q| q.sort = SortKey::Session),
            NOW,
        );
        assert_eq!(ids(&p), ["new", "old", "off"]);
    }

    fn view(id: &str, ssid: &str, online: bool, revoked: bool) -> DeviceView {
        DeviceView {
            record: crate::store::DeviceRecord {
                device_id: id.into(),
                groups: vec!["ward:4B".into()],
                created_at_ms: 0,
                credential_generation: 0,
                revoked,
                last_seen_ms: 0,
                last_ssid: ssid.into(),
                last_disconnect_reason: "device goodbye: GOODBYE_REASON_CLIENT_STOPPING".into(),
                sdk_version: "lpush-sdk/0.3.1".into(),
                voip_token: String::new(),
                voip_token_invalid: false,
                ca_generation: 0,
            },
            online,
            session_started_ms: None,
            queued: 2,
            node: None,
            clock_offset_ms: None,
        }
    }

    #[test]
    fn search_and_ssid_find_devices() {
        let mut icu = view("icu-7", "ICU", true, false);
        icu.record.groups = vec!["icu".into()];
        let mut old_sdk = view("bed-12", "Ward 4B", false, false);
        old_sdk.record.sdk_version = "lpush-sdk/0.2.9".into();
        let views = [icu, old_sdk, view("bed-120", "Ward 4B", false, false)];
        let found = |q: ListQuery| -> Vec<&str> {
            let (needle, mut buf) = (q.needle(), String::new());
            views
                .iter()
                .filter(|v| q.finds(&needle, v, "node-b", &mut buf))
                .map(|v| v.record.device_id.as_str())
                .collect()
        };
        let search = |text: &str| found(query(|q| q.q = text.into())).len();
        assert_eq!(search("BED-12"), 2, "case-insensitive, by id");
        assert_eq!(search("  0.2.9 "), 1, "by SDK version, trimmed");
        assert_eq!(search("icu"), 1, "by SSID");
        assert_eq!(search("ward:4b"), 2, "by group");
        assert_eq!(search("node-b"), 3, "by node");
        assert_eq!(search("client_stopping"), 3, "by stop reason");
        assert_eq!(search("nothing-like-it"), 0);
        assert_eq!(found(query(|q| q.ssid = "ICU".into())), ["icu-7"]);
        assert_eq!(
            found(query(|q| (q.ssid, q.q) = ("Ward 4B".into(), "120".into()))),
            ["bed-120"]
        );
    }

    #[test]
    fn state_filters_narrow_the_rows() {
        let mut revoked = row("lost-phone");
        revoked.revoked = true;
        let rows = vec![online("icu-7", NOW - 1), row("bed-12"), revoked, row("bed-120")];
        let filtered = |f: StateFilter| {
            ids(&page(
                rows.clone(),
                Counts::default(),
                &query(|q| q.state = f),
                NOW,
            ))
            .len()
        };
        assert_eq!(
            [
                StateFilter::All,
                StateFilter::Online,
                StateFilter::Offline,
                StateFilter::Revoked
            ]
            .map(filtered),
            [4, 1, 3, 1]
        );
    }

    #[test]
    fn counts_cover_every_device() {
        let views = [
            view("on", "Ward 4B", true, false),
            view("missing", "Ward 4B", false, false),
            view("home", "Ward 5C", false, false),
            view("gone", "Ward 4B", false, true),
            view("churning", "Ward 5C", true, false),
            view("elsewhere", "Ward 6D", false, false),
        ];
        let flagged = HashMap::from([("churning".to_string(), vec!["instance_churn"])]);
        let counts = Counts::of(&views, &flagged, &online_by_ssid(&views));
        assert_eq!(
            counts,
            Counts {
                total: 6,
                online: 2,
                queued: 12,
                flagged: 1,
                // The churning phone and the two offline while their ward has a phone online;
                // not the revoked one, nor the one on a ward with nobody online.
                problems: 3,
            }
        );
    }

    #[test]
    fn bad_queries_are_refused() {
        assert!(query(|q| q.limit = Some(0)).validate().is_err());
        assert!(query(|q| q.limit = Some(MAX_LIMIT + 1)).validate().is_err());
        assert!(query(|q| q.q = "x".repeat(MAX_QUERY + 1)).validate().is_err());
        assert!(query(|q| q.limit = Some(MAX_LIMIT)).validate().is_ok());
    }

    #[test]
    fn changes_batch_ids_then_say_many() {
        let mut c = Changes::default();
        assert_eq!(c.take(), None);
        c.device("b");
        c.device("a");
        c.device("b");
        let once = c.take().unwrap();
        assert_eq!(
            (once.ids, once.many, once.overview),
            (vec!["a".into(), "b".into()], false, false)
        );
        assert_eq!(c.take(), None, "taken");
        for i in 0..=MAX_CHANGED_IDS {
            c.device(&format!("p{i}"));
        }
        c.overview();
        let burst = c.take().unwrap();
        assert!(burst.many && burst.ids.is_empty() && burst.overview, "{burst:?}");
        c.everything();
        assert!(c.take().unwrap().many);
    }
}
