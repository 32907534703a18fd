import Contracts
import RPC
import Rules

/// A validated action: its wire form and its parsed eligibility rule.
/// A reference type: Decide passes every catalog entry around on every call, and copying the
/// action message each time showed as 2 % of the decision service's CPU in a profile.
public final class ActionSpec: Sendable {
    public let action: DecisionV1.Action
    let eligibility: Rule?
    /// The consent each channel needs (`purpose.channel`, or `purpose` for an action without
    /// channels), with the explanations Decide gives when it is denied or unknown: built once
    /// here, not for every candidate of every decision.
    let consentPaths: [ConsentPath]
    /// The longest cap or suppression window of the action, in seconds (0: none): how far
    /// back Decide reads the person's history for it.
    let longestWindowSeconds: Int64
    /// The action's size encoded (the catalog's bound on what every decision carries).
    let encodedSize: Int
    /// The exclusion when every consent path is unknown, and when every one is denied.
    let consentUnknownExclusion: String
    let consentDeniedExclusion: String
    /// "eligibility: <rule>" and "placement: offered only on ...", as Decide explains them.
    let eligibilityExclusion: String
    let placementExclusion: String

    struct ConsentPath: Sendable {
        let channel: CommonV1.Channel
        let path: String
        let denied: String
        let unknown: String
    }

    public var id: String { action.id }
    /// The lever, with 0 read as 1.
    var lever: Double { action.lever == 0 ? 1 : action.lever }

    static let maxCaps = 20
    static let maxSuppressions = 20
    static let maxWindowSeconds: Int64 = 400 * 86_400
    /// Bounds that keep every score (response rate × value × lever, and its spread) finite:
    /// a value of 1e308 made the choice probabilities NaN.
    static let maxValue = 1e12
    static let maxLever = 1e6

    /// Validates `action`; every error names its field (`action.eligibility`, `action.caps[1].max`, ...).
    public init(_ action: DecisionV1.Action) throws(RPCError) {
        try Names.check(action.id, field: "action.id")
        guard action.name.utf8.count <= 256 else { throw .invalidArgument(field: "action.name", "is longer than 256 bytes") }
        guard action.placements.count <= 50 else { throw .invalidArgument(field: "action.placements", "at most 50") }
        for (i, placement) in action.placements.enumerated() { try Names.check(placement, field: "action.placements[\(i)]") }
        guard action.channels.count <= 5 else { throw .invalidArgument(field: "action.channels", "at most 5") }
        for (i, channel) in action.channels.enumerated() {
            try Channels.check(channel, field: "action.channels[\(i)]")
            guard !action.channels[..<i].contains(channel) else {
                throw .invalidArgument(field: "action.channels[\(i)]", "appears twice")
            }
        }
        guard action.value.isFinite, action.value > 0, action.value <= Self.maxValue else {
            throw .invalidArgument(field: "action.value", "must be a positive number up to 1e12, got \(action.value)")
        }
        guard action.lever.isFinite, action.lever >= 0, action.lever <= Self.maxLever else {
            throw .invalidArgument(field: "action.lever", "must be positive, up to 1e6 (0 means 1), got \(action.lever)")
        }
        guard action.startsAtMs >= 0 else { throw .invalidArgument(field: "action.starts_at_ms", "must not be negative") }
        guard action.endsAtMs >= 0 else { throw .invalidArgument(field: "action.ends_at_ms", "must not be negative") }
        if action.endsAtMs != 0, action.endsAtMs <= action.startsAtMs {
            throw .invalidArgument(field: "action.ends_at_ms", "must be after starts_at_ms")
        }
        eligibility = try Self.rule(action.eligibility, field: "action.eligibility")
        guard action.suppressions.count <= Self.maxSuppressions else {
            throw .invalidArgument(field: "action.suppressions", "at most \(Self.maxSuppressions)")
        }
        for (i, suppression) in action.suppressions.enumerated() {
            guard (1...6).contains(suppression.outcome.rawValue) else {
                throw .invalidArgument(field: "action.suppressions[\(i)].outcome", "must be an outcome (OUTCOME_IMPRESSION ... OUTCOME_UNSUBSCRIBE)")
            }
            try Self.window(suppression.windowSeconds, field: "action.suppressions[\(i)].window_seconds")
        }
        guard action.caps.count <= Self.maxCaps else { throw .invalidArgument(field: "action.caps", "at most \(Self.maxCaps)") }
        for (i, cap) in action.caps.enumerated() {
            try Self.check(cap, field: "action.caps[\(i)]", onAction: true)
        }
        if !action.consentPurpose.isEmpty { try Names.check(action.consentPurpose, field: "action.consent_purpose") }
        guard action.priorResponseRate >= 0, action.priorResponseRate < 1 else {
            throw .invalidArgument(field: "action.prior_response_rate", "must be in [0, 1) (0: the service default)")
        }
        guard action.holdoutShare >= 0, action.holdoutShare <= 0.5 else {
            throw .invalidArgument(field: "action.holdout_share", "must be between 0 and 0.5, got \(action.holdoutShare)")
        }
        self.action = action
        encodedSize = action.serializedBytes().count
        let purpose = action.consentPurpose
        let paths = purpose.isEmpty ? [] : action.channels.isEmpty ? [(CommonV1.Channel.unspecified, purpose)]
            : action.channels.map { ($0, "\(purpose).\($0.ruleName)") }
        consentPaths = paths.map { ConsentPath(channel: $0, path: $1, denied: "consent.\($1) is denied", unknown: "consent.\($1) is unknown") }
        longestWindowSeconds = (action.caps.map(\.windowSeconds) + action.suppressions.map(\.windowSeconds)).max() ?? 0
        consentUnknownExclusion = "consent: " + consentPaths.map(\.unknown).joined(separator: "; ")
        consentDeniedExclusion = "consent: " + consentPaths.map(\.denied).joined(separator: "; ")
        eligibilityExclusion = "eligibility: \(eligibility?.source ?? "")"
        placementExclusion = "placement: offered only on \(action.placements.joined(separator: ", "))"
    }

    /// An eligibility rule: the namespaces a decision can read.
    /// `kinds` as `Rule.init` takes it: given when an action is written, not when read back.
    static func rule(_ text: String, field: String, kinds: ((String, String) -> Rule.Kind?)? = nil) throws(RPCError) -> Rule? {
        guard !text.isEmpty else { return nil }
        do {
            return try Rule(text, check: { namespace, name in
                switch namespace {
                case "trait", "feature", "segment", "context": return nil
                case "consent":
                    // The purpose may hold dots itself (SetConsent takes `news.weekly`): the channel
                    // is what follows the last one.
                    let parts = name.split(separator: ".", omittingEmptySubsequences: false)
                    return parts.count >= 2 && parts.allSatisfy({ !$0.isEmpty }) ? nil : "consent paths are consent.<purpose>.<channel>"
                default: return "unknown namespace \"\(namespace)\" (trait., feature., segment., consent., context.)"
                }
            }, kinds: kinds)
        } catch {
            throw .invalidArgument(field: field, error.description)
        }
    }

    static func window(_ seconds: Int64, field: String) throws(RPCError) {
        guard seconds > 0, seconds <= maxWindowSeconds else {
            throw .invalidArgument(field: field, "must be between 1 and \(maxWindowSeconds) seconds, got \(seconds)")
        }
    }

    /// A cap on an action (its scope may be ACTION or TOTAL, both meaning this action) or in
    /// the contact policy (ACTION: each action, CHANNEL: one channel, TOTAL: all offers).
    static func check(_ cap: DecisionV1.Cap, field: String, onAction: Bool) throws(RPCError) {
        switch cap.scope {
        case .action, .total: break
        case .channel where !onAction: try Channels.check(cap.channel, field: "\(field).channel")
        case .channel: throw .invalidArgument(field: "\(field).scope", "a cap on an action counts that action's offers (SCOPE_ACTION); channel caps belong in the contact policy")
        default: throw .invalidArgument(field: "\(field).scope", "must be SCOPE_ACTION, SCOPE_CHANNEL or SCOPE_TOTAL")
        }
        guard cap.max > 0 else { throw .invalidArgument(field: "\(field).max", "must be positive") }
        try window(cap.windowSeconds, field: "\(field).window_seconds")
    }

    func isActive(at now: Int64) -> Bool {
        !action.retired && (action.startsAtMs == 0 || now >= action.startsAtMs) && (action.endsAtMs == 0 || now < action.endsAtMs)
    }

    func offers(_ placement: String) -> Bool { action.placements.isEmpty || action.placements.contains(placement) }
}

enum Channels {
    /// Every channel a delivery can go on.
    static let all: [CommonV1.Channel] = (1...5).map { CommonV1.Channel(rawValue: Int32($0)) }

    static func check(_ channel: CommonV1.Channel, field: String) throws(RPCError) {
        guard !channel.ruleName.isEmpty else {
            throw .invalidArgument(field: field, "must be CHANNEL_EMAIL, CHANNEL_SMS, CHANNEL_PUSH, CHANNEL_IN_APP or CHANNEL_WEBHOOK")
        }
    }
}
