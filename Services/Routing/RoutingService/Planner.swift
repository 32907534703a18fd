import Contracts
import Foundation
import Rules

/// Decayed engagement evidence: sends and engagements (an open or a click) on one channel,
/// or the engagements in one local hour of the day.
struct Engagement: Sendable, Equatable {
    var sends = 0.0
    var engaged = 0.0
    var updatedMs: Int64 = 0

    /// Both counts halve every half-life.
    func decayed(to now: Int64, halfLifeMs: Double) -> Engagement {
        guard now > updatedMs, updatedMs > 0 else { return Engagement(sends: sends, engaged: engaged, updatedMs: max(now, updatedMs)) }
        let factor = exp2(-Double(now - updatedMs) / halfLifeMs)
        return Engagement(sends: sends * factor, engaged: engaged * factor, updatedMs: now)
    }

    static func + (a: Engagement, b: Engagement) -> Engagement {
        Engagement(sends: a.sends + b.sends, engaged: a.engaged + b.engaged, updatedMs: max(a.updatedMs, b.updatedMs))
    }
}

/// `value` with `digits` decimals, as `%.<digits>f` prints it but without Foundation's
/// formatter (`String(format:)` took most of the planner's time under load).
func decimal(_ value: Double, _ digits: Int) -> String {
    let scale = Int64(pow(10, Double(digits)))
    let scaled = (abs(value) * Double(scale)).rounded()
    guard value.isFinite, scaled < 1e15 else { return "\(value)" }
    let units = Int64(scaled)
    let fraction = String(units % scale)
    return (value.sign == .minus ? "-" : "") + "\(units / scale)"
        + (digits > 0 ? "." + String(repeating: "0", count: digits - fraction.count) + fraction : "")
}

/// Keys of the engagement table: a channel (1–5) or a local hour of the day (100 + hour).
enum EngagementKey {
    static func channel(_ channel: CommonV1.Channel) -> Int { Int(channel.rawValue) }
    static func hour(_ hour: Int) -> Int { 100 + hour }
    static let hours = 100..<124
}

/// What the routing store knows about one person (or, with person "", the population).
struct Evidence: Sendable {
    var engagement: [Int: Engagement] = [:]
    /// (purpose, channel raw value, when it happened, when this service learned it) of
    /// unsubscribes and complaints recorded here.
    var optOuts: [(purpose: String, channel: Int32, atMs: Int64, recordedAtMs: Int64)] = []
    /// "channel address" pairs that hard-bounced.
    var unreachable: Set<String> = []
    /// Read for a send (`RoutingStore.beforeSending`), to check the caps again: the person's
    /// deliveries sent in the 7 days before it, and those scheduled in the 7 days after it
    /// (channel raw value, when sent or planned).
    var contacts: [(channel: Int32, atMs: Int64)] = []

    func engagement(_ key: Int, now: Int64, halfLifeMs: Double) -> Engagement {
        (engagement[key] ?? Engagement()).decayed(to: now, halfLifeMs: halfLifeMs)
    }

    /// Local hours ranked by engagement, best first, when there are at least `minimum` engagements.
    func bestHours(now: Int64, halfLifeMs: Double, minimum: Double) -> [Int] {
        let weights = (0..<24).map { engagement(EngagementKey.hour($0), now: now, halfLifeMs: halfLifeMs).engaged }
        guard weights.reduce(0, +) >= max(minimum, 1e-9) else { return [] }
        return (0..<24).filter { weights[$0] > 0 }.sorted { weights[$0] > weights[$1] || (weights[$0] == weights[$1] && $0 < $1) }
    }

    static func unreachableKey(_ channel: CommonV1.Channel, _ address: String) -> String { "\(channel.rawValue) \(address)" }
}

/// Plans a delivery from the profile and the store's evidence: every channel judged
/// (consent, then reachability, then learned preference), ranked, and a send time chosen.
/// Caps are applied later, inside the write that stores the delivery.
struct Planner {
    let configuration: RoutingConfiguration
    /// Channels that have an adapter.
    let adapters: Set<CommonV1.Channel>

    static let allChannels = CommonV1.Channel.delivery

    func plan(_ request: RoutingV1.RouteRequest, profile: ProfileV1.ProfileView, person: Evidence, population: Evidence,
              now: Int64) -> RoutingV1.Delivery {
        var delivery = RoutingV1.Delivery()
        delivery.personId = profile.personId
        delivery.idempotencyKey = request.idempotencyKey
        delivery.message = request.message
        delivery.purpose = request.purpose
        delivery.urgency = request.urgency
        delivery.createdAtMs = now
        delivery.notAfterMs = request.notAfterMs
        let traits = Self.traits(profile)
        let zoneName: String
        if case .string(let name)? = traits[configuration.timeZoneTrait], TimeZone(identifier: name) != nil {
            zoneName = name
        } else {
            zoneName = configuration.defaultTimeZone
        }
        delivery.timeZone = zoneName

        func suppress(_ reason: String, _ detail: String) -> RoutingV1.Delivery {
            delivery.state = .suppressed
            delivery.suppressionReason = reason
            delivery.suppressionDetail = detail
            return delivery
        }
        if request.notAfterMs > 0 && request.notAfterMs < now {
            return suppress("expired", "not_after \(request.notAfterMs) is before now \(now)")
        }

        // Channels: consent, reachability, preference.
        let halfLife = configuration.halfLifeMs
        let candidates = request.allowedChannels.isEmpty ? Self.allChannels : request.allowedChannels
        var assessments: [RoutingV1.ChannelAssessment] = []
        for channel in candidates {
            var a = RoutingV1.ChannelAssessment()
            a.channel = channel
            let popRate: Double = {
                let e = population.engagement(EngagementKey.channel(channel), now: now, halfLifeMs: halfLife)
                return (e.engaged + 1) / (e.sends + 2)
            }()
            let mine = person.engagement(EngagementKey.channel(channel), now: now, halfLifeMs: halfLife)
            let k = configuration.preferencePriorStrength
            a.preference = (mine.engaged + k * popRate) / (mine.sends + k)
            if let refusal = consentRefusal(channel, purpose: request.purpose, profile: profile, person: person) {
                a.excluded = "no_consent"
                a.detail = refusal
            } else {
                switch address(channel, traits: traits, personID: profile.personId) {
                case .failure(let why):
                    a.excluded = "unreachable"
                    a.detail = why.description
                case .success(let address):
                    if person.unreachable.contains(Evidence.unreachableKey(channel, address)) {
                        a.excluded = "unreachable"
                        a.detail = "\(address) hard-bounced"
                    } else {
                        a.address = address
                        a.detail = "usable; engagement \(decimal(a.preference, 3)) (\(decimal(mine.engaged, 1)) engaged of "
                            + "\(decimal(mine.sends, 1)) sent, population \(decimal(popRate, 3)))"
                    }
                }
            }
            assessments.append(a)
        }
        // Usable channels first, by preference (ties keep the caller's order).
        let order = Dictionary(uniqueKeysWithValues: assessments.enumerated().map { ($1.channel, $0) })
        assessments.sort { x, y in
            if x.excluded.isEmpty != y.excluded.isEmpty { return x.excluded.isEmpty }
            if x.preference != y.preference { return x.preference > y.preference }
            return order[x.channel]! < order[y.channel]!
        }
        delivery.channels = assessments
        let usable = assessments.filter { $0.excluded.isEmpty }
        guard !usable.isEmpty else {
            let reason = assessments.contains { $0.excluded == "unreachable" } ? "unreachable" : "no_consent"
            return suppress(reason, assessments.map { "\($0.channel.ruleName): \($0.detail)" }.joined(separator: "; "))
        }
        delivery.channel = usable[0].channel
        delivery.address = usable[0].address
        delivery.fallbackChannels = usable.dropFirst().map(\.channel)

        // Timing.
        let start = max(now, request.notBeforeMs)
        let end = request.notAfterMs > 0 ? request.notAfterMs : start + Int64(configuration.sendWindowHours) * 3_600_000
        var best = person.bestHours(now: now, halfLifeMs: halfLife, minimum: configuration.minPersonEngagements)
        var source = "person's"
        if best.isEmpty {
            best = population.bestHours(now: now, halfLifeMs: halfLife, minimum: configuration.minPopulationEngagements)
            source = "population's"
        }
        let clock = LocalClock(TimeZone(identifier: zoneName) ?? TimeZone(identifier: "UTC")!)
        switch SendTime.choose(start: start, end: end, critical: request.urgency == .critical, clock: clock,
                               quiet: configuration.quietHours, bestHours: best, bestHoursSource: source) {
        case .suppressed(let reason, let detail):
            return suppress(reason, detail)
        case .at(let at, let reason):
            delivery.state = .scheduled
            delivery.sendAtMs = at
            delivery.nextAttemptAtMs = at
            delivery.sendTimeReason = reason
            return delivery
        }
    }

    /// Why the person may not be contacted on `channel` for `purpose`, or nil when they may:
    /// the profile's consent for purpose and channel (the newer of the channel's record and
    /// the purpose's record for every channel: `governingConsent`) must be granted, and not
    /// followed by an unsubscribe or complaint recorded here.
    func consentRefusal(_ channel: CommonV1.Channel, purpose: String, profile: ProfileV1.ProfileView, person: Evidence) -> String? {
        if let refusal = Self.profileConsentRefusal(channel, purpose: purpose, consent: profile.consent) { return refusal }
        let record = Self.governing(channel, purpose: purpose, consent: profile.consent)!
        if let optOut = person.optOuts.first(where: {
            $0.purpose == purpose && ($0.channel == channel.rawValue || $0.channel == 0) && $0.atMs >= record.atMs
        }) {
            return "unsubscribed or complained at \(optOut.atMs) (after consent at \(record.atMs))"
        }
        return nil
    }

    /// Why the profile's consent records do not let the person be contacted on `channel` for
    /// `purpose` (none recorded, or denied), or nil when they do. Also used at send time.
    static func profileConsentRefusal(_ channel: CommonV1.Channel, purpose: String, consent: [ProfileV1.ConsentRecord]) -> String? {
        guard let record = governing(channel, purpose: purpose, consent: consent) else {
            return "no consent recorded for \(purpose).\(channel.ruleName)"
        }
        guard record.granted else { return "consent \(purpose).\(channel.ruleName) denied by \(record.source) at \(record.atMs)" }
        return nil
    }

    /// The record that governs `purpose` on `channel`: the newer of the channel's own and the
    /// purpose's record for every channel (`governingConsent`).
    static func governing(_ channel: CommonV1.Channel, purpose: String, consent: [ProfileV1.ConsentRecord]) -> ProfileV1.ConsentRecord? {
        let exact = consent.first { $0.purpose == purpose && $0.channel == channel }
        let general = consent.first { $0.purpose == purpose && $0.channel == .unspecified }
        return governingConsent(exact: exact, general: general, atMs: \.atMs)
    }

    /// The profile's traits by name, as rules read them.
    static func traits(_ profile: ProfileV1.ProfileView) -> [String: RuleValue] {
        Dictionary(profile.traits.compactMap { t in RuleValue(t.value).map { (t.name, $0) } }, uniquingKeysWith: { a, _ in a })
    }

    /// The channel's address from the profile's traits, or why there is none.
    func address(_ channel: CommonV1.Channel, traits: [String: RuleValue], personID: String) -> Result<String, AddressError> {
        guard adapters.contains(channel) else { return .failure(AddressError("no adapter configured for \(channel.ruleName)")) }
        return Self.address(channel, traits: traits, personID: personID, configuration: configuration)
    }

    /// The channel's address from the profile's traits (`addressTraits`, `verifiedTraits`), or
    /// why there is none; whether an adapter serves the channel aside.
    static func address(_ channel: CommonV1.Channel, traits: [String: RuleValue], personID: String,
                        configuration: RoutingConfiguration) -> Result<String, AddressError> {
        let name = channel.ruleName
        let trait = configuration.addressTraits[name] ?? ""
        guard !trait.isEmpty else { return .success(personID) }
        guard case .string(let address)? = traits[trait], !address.isEmpty else {
            return .failure(AddressError("no \(trait) trait"))
        }
        if let verified = configuration.verifiedTraits[name], !verified.isEmpty {
            guard case .bool(true)? = traits[verified] else {
                return .failure(AddressError("\(trait) is not verified (\(verified) is not true)"))
            }
        }
        return .success(address)
    }

    struct AddressError: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }
}
