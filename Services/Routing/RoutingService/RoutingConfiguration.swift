import Contracts
import Foundation
import Rules

/// The routing service's settings (the `routing` section of `--config`). Every key may be
/// left out; defaults are given per field. A bad value stops the service at start with a
/// message naming the key.
public struct RoutingConfiguration: Sendable, Codable, Equatable {
    /// The HTTP endpoint every channel without a dedicated adapter posts to (sms, push,
    /// in_app, webhook; email too when `smtp` is not set). Unset: those channels are unreachable.
    public var webhook: Webhook?
    /// The SMTP relay for email. Unset: email goes to the webhook, if any.
    public var smtp: SMTP?
    /// Quiet hours in the person's time zone, "HH:MM". Default 21:00–08:00.
    public var quietHoursStart = "21:00"
    public var quietHoursEnd = "08:00"
    /// Time zone of persons without a valid `timezone` trait. Default "UTC".
    public var defaultTimeZone = "UTC"
    /// How far ahead a normal message may be scheduled when the request sets no
    /// `not_after` (send-time optimization looks within it). Default 24.
    public var sendWindowHours = 24
    /// Deliveries per person in any 24 hours / 7 days, all channels. Defaults 3 and 10.
    public var capPerDay = 3
    public var capPerWeek = 10
    /// Deliveries per person per channel in any 24 hours / 7 days. Defaults 2 and 5.
    public var capPerChannelPerDay = 2
    public var capPerChannelPerWeek = 5
    /// Engagement evidence halves in this many days. Default 30.
    public var preferenceHalfLifeDays = 30.0
    /// Weight of the population's engagement rate in a person's, in pseudo-sends. Default 5.
    public var preferencePriorStrength = 5.0
    /// Engagements a person needs before their own best hour is used. Default 3.
    public var minPersonEngagements = 3.0
    /// Engagements the population needs before its best hour is used. Default 20.
    public var minPopulationEngagements = 20.0
    /// Attempts per channel before falling back to the next channel, or dead-lettering. Default 6.
    public var maxAttempts = 6
    /// Backoff before the second attempt; doubles per attempt, each wait drawn between half and all of it (equal jitter), up to
    /// `maxBackoffMs`. Defaults 1000 and 600000.
    public var initialBackoffMs = 1000
    public var maxBackoffMs = 600_000
    /// Transient failures in a row that open an adapter's circuit (the webhook endpoint, the
    /// SMTP relay): its deliveries then wait in the outbox without spending attempts, and one
    /// goes as a probe after `breakerCooldownMs`, doubling per failed probe up to
    /// `breakerMaxCooldownMs` (a `Retry-After` lengthens it). 0: never open. Defaults 5, 5000
    /// and 60000.
    public var breakerFailures = 5
    public var breakerCooldownMs = 5000
    public var breakerMaxCooldownMs = 60_000
    /// Deliveries sent at once. Default 64.
    public var dispatchConcurrency = 64
    /// How often the dispatcher looks for due deliveries when idle. Default 50.
    public var dispatchPollMs = 50
    /// Longest wait for the profile service. Default 2000.
    public var profileTimeoutMs = 2000
    /// A delivery attempted this long after it was planned (scheduled for later, retried,
    /// fallen back, requeued) first reads the person's consent from the profile service
    /// again: a consent withdrawn since the plan stops it on that channel. While the profile
    /// service cannot answer, the delivery waits (`initialBackoffMs` between tries): consent
    /// is never guessed. 0: before every attempt. Default 1000.
    public var consentRecheckAfterMs = 1000
    /// The profile traits that hold each channel's address ("" means the person id itself:
    /// the system behind the webhook knows the person). Defaults below.
    public var addressTraits: [String: String] = ["email": "email", "sms": "phone", "push": "push_token", "in_app": "", "webhook": ""]
    /// Boolean traits that must be true before an address is used. Defaults below.
    public var verifiedTraits: [String: String] = ["email": "email_verified", "sms": "phone_verified"]
    /// The trait holding the person's IANA time zone. Default "timezone".
    public var timeZoneTrait = "timezone"
    /// Deliveries that are done (sent, suppressed, dead letters) are deleted, with their
    /// events, this many days after their send time and last attempt (`RoutingStore.pruner`);
    /// 0 keeps every one. At least 30 when set: the caps count a week of sends, and an
    /// unsubscribe or a bounce reported for a deleted delivery is NOT_FOUND (unsubscribe links
    /// are expected to work for 30 days). A Route retried with the key of a deleted delivery
    /// makes a new one. Default 0.
    public var outboxRetentionDays = 0

    public struct Webhook: Sendable, Codable, Equatable {
        /// `http://host:port/path`.
        public var url: String
        /// File holding the HMAC-SHA256 key for the `X-Arbiter-Signature` header. Unset: unsigned.
        public var secretFile: String?
        /// Default 5000.
        public var timeoutMs = 5000

        public init(url: String, secretFile: String? = nil, timeoutMs: Int = 5000) {
            self.url = url
            self.secretFile = secretFile
            self.timeoutMs = timeoutMs
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(url: try c.decode(String.self, forKey: .url), secretFile: try c.decodeIfPresent(String.self, forKey: .secretFile),
                      timeoutMs: try c.decodeIfPresent(Int.self, forKey: .timeoutMs) ?? 5000)
        }
    }

    public struct SMTP: Sendable, Codable, Equatable {
        public var host = "127.0.0.1"
        /// Default 25.
        public var port = 25
        /// The envelope and header sender.
        public var from: String
        /// The name sent with EHLO. Default "arbiter.localhost".
        public var heloName = "arbiter.localhost"
        /// Default 10000.
        public var timeoutMs = 10_000

        public init(host: String = "127.0.0.1", port: Int = 25, from: String) {
            self.host = host
            self.port = port
            self.from = from
        }

        public init(from decoder: any Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(host: try c.decodeIfPresent(String.self, forKey: .host) ?? "127.0.0.1",
                      port: try c.decodeIfPresent(Int.self, forKey: .port) ?? 25, from: try c.decode(String.self, forKey: .from))
            heloName = try c.decodeIfPresent(String.self, forKey: .heloName) ?? heloName
            timeoutMs = try c.decodeIfPresent(Int.self, forKey: .timeoutMs) ?? timeoutMs
        }
    }

    public init() {}

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        var v = Self()
        func take<T: Decodable>(_ key: CodingKeys, _ value: inout T) throws {
            if let decoded = try c.decodeIfPresent(T.self, forKey: key) { value = decoded }
        }
        v.webhook = try c.decodeIfPresent(Webhook.self, forKey: .webhook)
        v.smtp = try c.decodeIfPresent(SMTP.self, forKey: .smtp)
        try take(.quietHoursStart, &v.quietHoursStart)
        try take(.quietHoursEnd, &v.quietHoursEnd)
        try take(.defaultTimeZone, &v.defaultTimeZone)
        try take(.sendWindowHours, &v.sendWindowHours)
        try take(.capPerDay, &v.capPerDay)
        try take(.capPerWeek, &v.capPerWeek)
        try take(.capPerChannelPerDay, &v.capPerChannelPerDay)
        try take(.capPerChannelPerWeek, &v.capPerChannelPerWeek)
        try take(.preferenceHalfLifeDays, &v.preferenceHalfLifeDays)
        try take(.preferencePriorStrength, &v.preferencePriorStrength)
        try take(.minPersonEngagements, &v.minPersonEngagements)
        try take(.minPopulationEngagements, &v.minPopulationEngagements)
        try take(.maxAttempts, &v.maxAttempts)
        try take(.initialBackoffMs, &v.initialBackoffMs)
        try take(.maxBackoffMs, &v.maxBackoffMs)
        try take(.breakerFailures, &v.breakerFailures)
        try take(.breakerCooldownMs, &v.breakerCooldownMs)
        try take(.breakerMaxCooldownMs, &v.breakerMaxCooldownMs)
        try take(.dispatchConcurrency, &v.dispatchConcurrency)
        try take(.dispatchPollMs, &v.dispatchPollMs)
        try take(.profileTimeoutMs, &v.profileTimeoutMs)
        try take(.consentRecheckAfterMs, &v.consentRecheckAfterMs)
        if let traits = try c.decodeIfPresent([String: String].self, forKey: .addressTraits) {
            v.addressTraits.merge(traits) { $1 }
        }
        if let traits = try c.decodeIfPresent([String: String].self, forKey: .verifiedTraits) {
            v.verifiedTraits.merge(traits) { $1 }
        }
        try take(.timeZoneTrait, &v.timeZoneTrait)
        try take(.outboxRetentionDays, &v.outboxRetentionDays)
        if let problem = v.problem() {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: problem))
        }
        self = v
    }

    /// The first invalid setting, named, or nil.
    public func problem() -> String? {
        func range<T: Comparable>(_ name: String, _ value: T, _ bounds: ClosedRange<T>) -> String? {
            bounds.contains(value) ? nil : "\(name) must be between \(bounds.lowerBound) and \(bounds.upperBound), got \(value)"
        }
        let channelNames = Set((1...5).map { CommonV1.Channel(rawValue: Int32($0)).ruleName })
        let checks: [String?] = [
            QuietHours(start: quietHoursStart, end: quietHoursEnd) == nil ? "quietHoursStart/quietHoursEnd must be \"HH:MM\", got \"\(quietHoursStart)\"–\"\(quietHoursEnd)\"" : nil,
            TimeZone(identifier: defaultTimeZone) == nil ? "defaultTimeZone: unknown time zone \"\(defaultTimeZone)\"" : nil,
            range("sendWindowHours", sendWindowHours, 1...24 * 30),
            range("capPerDay", capPerDay, 0...10_000), range("capPerWeek", capPerWeek, 0...10_000),
            range("capPerChannelPerDay", capPerChannelPerDay, 0...10_000), range("capPerChannelPerWeek", capPerChannelPerWeek, 0...10_000),
            range("preferenceHalfLifeDays", preferenceHalfLifeDays, 0.01...3650),
            range("preferencePriorStrength", preferencePriorStrength, 0.01...1_000_000),
            range("minPersonEngagements", minPersonEngagements, 0...1_000_000),
            range("minPopulationEngagements", minPopulationEngagements, 0...1_000_000),
            range("maxAttempts", maxAttempts, 1...100),
            range("initialBackoffMs", initialBackoffMs, 1...3_600_000), range("maxBackoffMs", maxBackoffMs, initialBackoffMs...86_400_000),
            range("breakerFailures", breakerFailures, 0...10_000), range("breakerCooldownMs", breakerCooldownMs, 1...3_600_000),
            range("breakerMaxCooldownMs", breakerMaxCooldownMs, breakerCooldownMs...86_400_000),
            range("dispatchConcurrency", dispatchConcurrency, 1...4096), range("dispatchPollMs", dispatchPollMs, 1...60_000),
            range("profileTimeoutMs", profileTimeoutMs, 1...60_000),
            range("consentRecheckAfterMs", consentRecheckAfterMs, 0...86_400_000),
            outboxRetentionDays == 0 ? nil
                : range("outboxRetentionDays", outboxRetentionDays, 30...36_500).map { $0 + " (0 keeps every delivery; events are reported for 30 days)" },
            addressTraits.keys.first { !channelNames.contains($0) }.map { "addressTraits: unknown channel \"\($0)\"" },
            verifiedTraits.keys.first { !channelNames.contains($0) }.map { "verifiedTraits: unknown channel \"\($0)\"" },
            webhook.flatMap { webhook in
                WebhookAdapter.Endpoint(webhook.url) == nil ? "webhook.url must be http://host[:port]/path, got \"\(webhook.url)\"" : range("webhook.timeoutMs", webhook.timeoutMs, 1...600_000)
            },
            smtp.flatMap { smtp in
                smtp.from.contains("@") && !smtp.from.contains(where: { $0.isNewline || $0 == ">" || $0 == "<" })
                    ? range("smtp.port", smtp.port, 1...65535) ?? range("smtp.timeoutMs", smtp.timeoutMs, 1...600_000)
                    : "smtp.from must be an email address, got \"\(smtp.from)\""
            },
        ]
        return checks.compactMap { $0 }.first
    }

    var halfLifeMs: Double { preferenceHalfLifeDays * 86_400_000 }
    var quietHours: QuietHours { QuietHours(start: quietHoursStart, end: quietHoursEnd)! }
}
