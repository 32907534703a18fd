public import Contracts

/// Conversions between the wire's `arbiter.common.v1` values and rule values, shared by
/// every service that evaluates rules over what clients send.
extension RuleValue {
    /// The rule value of a wire value; nil when the value is unset.
    public init?(_ value: CommonV1.Value?) {
        switch value?.kind {
        case .stringValue(let s)?: self = .string(s)
        case .numberValue(let n)?: self = .number(n)
        case .boolValue(let b)?: self = .bool(b)
        case nil: return nil
        }
    }
}

extension CommonV1.Value {
    public init(_ value: RuleValue) {
        self.init()
        switch value {
        case .string(let s): kind = .stringValue(s)
        case .number(let n): kind = .numberValue(n)
        case .bool(let b): kind = .boolValue(b)
        }
    }
}

extension CommonV1.Field {
    public init(_ name: String, _ value: RuleValue) {
        self.init()
        self.name = name
        self.value = CommonV1.Value(value)
    }
}

extension CommonV1.Channel {
    /// Every channel a message can go out on (all but UNSPECIFIED).
    public static let delivery: [CommonV1.Channel] = [.email, .sms, .push, .inApp, .webhook]

    /// The channel's name in rule paths such as `consent.marketing.email`: `email`, `sms`,
    /// `push`, `in_app`, `webhook`; empty for an unknown channel.
    public var ruleName: String {
        switch rawValue {
        case 1: return "email"
        case 2: return "sms"
        case 3: return "push"
        case 4: return "in_app"
        case 5: return "webhook"
        default: return ""
        }
    }
}

/// Which of a person's current consent records governs a purpose on one channel: the newer
/// of the channel's own record and the purpose's record for every channel (the channel's own
/// when both are as new); nil when there is neither. Profile segments, Decide and routing
/// all read consent this way, so a blanket denial given after a channel's grant holds.
public func governingConsent<Record>(exact: Record?, general: Record?, atMs: (Record) -> Int64) -> Record? {
    guard let exact, let general else { return exact ?? general }
    return atMs(general) > atMs(exact) ? general : exact
}
