import Contracts
import Crypto
import Foundation
import GRDB
import IdentityFeed
import Logging
@testable import ProfileService
import RPC
@testable import RoutingService
import Rules
import TestSupport
import Testing

/// 2026-06-01 10:00 UTC: noon in Paris, 03:00 in Los Angeles, 19:00 in Tokyo.
let june1 = Int64(1_780_308_000_000)
let hour = Int64(3_600_000)
let day = 24 * hour

func routeRequest(_ person: String, key: String, channels: [CommonV1.Channel] = [], critical: Bool = false,
                  purpose: String = "marketing", notBefore: Int64 = 0, notAfter: Int64 = 0,
                  variables: [String: String] = ["subject": "Hello", "body": "Line one\n.line two"]) -> RoutingV1.RouteRequest {
    var request = RoutingV1.RouteRequest()
    request.person = personRef(person)
    var message = RoutingV1.Message()
    message.templateId = "welcome"
    message.variables = variables
    request.message = message
    request.allowedChannels = channels
    request.urgency = critical ? .critical : .normal
    request.idempotencyKey = key
    request.purpose = purpose
    request.notBeforeMs = notBefore
    request.notAfterMs = notAfter
    return request
}

func event(_ delivery: String, _ kind: RoutingV1.DeliveryEventKind, at: Int64 = 0, hard: Bool = false) -> RoutingV1.ReportDeliveryEventRequest {
    var request = RoutingV1.ReportDeliveryEventRequest()
    request.deliveryId = delivery
    request.kind = kind
    request.occurredAtMs = at
    request.hardBounce = hard
    return request
}

/// A person reachable and consenting on email (verified) and push, in `zone`.
func seedReachable(_ store: ProfileStore, _ person: String, zone: String = "Europe/Paris", at: Int64,
                   channels: [CommonV1.Channel] = [.email, .push, .webhook]) throws {
    try seed(store, person, traits: [("email", .string("\(person)@example.com")), ("email_verified", .bool(true)),
                                     ("push_token", .string("tok-\(person)")), ("timezone", .string(zone))],
             consent: channels.map { ("marketing", $0, true) }, at: at)
}

/// Runs `body` with a routing service over a real profile server; the webhook adapter posts
/// to a real local sink. The service is shut down afterwards.
func withRouting<T: Sendable>(clock: TestClock? = nil, sink: WebhookSink? = nil, smtpPort: Int? = nil, secretFile: String? = nil,
                              configure: @Sendable (inout RoutingConfiguration) -> Void = { _ in },
                              _ body: @Sendable (RoutingService, ProfileService, WebhookSink) async throws -> T) async throws -> T {
    let profileClock = clock ?? TestClock()
    let sink = if let sink { sink } else { try await WebhookSink.start() }
    return try await withProfile(clock: profileClock) { profile, client in
        var configuration = RoutingConfiguration()
        configuration.webhook = .init(url: "http://127.0.0.1:\(sink.port)/hooks", secretFile: secretFile)
        if let smtpPort { configuration.smtp = .init(port: smtpPort, from: "arbiter@example.com") }
        configuration.initialBackoffMs = 5
        configuration.maxBackoffMs = 20
        configuration.dispatchPollMs = 5
        // No test here is about the profile call's deadline (2 s by default), and on a
        // contended host the parallel test run once held an in-process GetProfile longer.
        configuration.profileTimeoutMs = 10_000
        configure(&configuration)
        let logger = quietLogger("routing-test")
        let store = try RoutingStore(directory: temporaryDirectory("routing-test"), configuration: configuration)
        let realClock: @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }
        let service = try RoutingService(store: store, configuration: configuration, profile: client, group: .singletonMultiThreadedEventLoopGroup,
                                         logger: logger, clock: clock?.read ?? realClock)
        do {
            let result = try await body(service, profile, sink)
            await service.shutdown()
            return result
        } catch {
            await service.shutdown()
            throw error
        }
    }
}

/// A configuration with these caps: per day, per week, per channel per day, per channel per week.
func capped(_ caps: (Int, Int, Int, Int)) -> @Sendable (inout RoutingConfiguration) -> Void {
    { ($0.capPerDay, $0.capPerWeek, $0.capPerChannelPerDay, $0.capPerChannelPerWeek) = caps }
}

/// A configuration no cap holds back, for tests about something else.
let uncapped = capped((100, 100, 100, 100))

/// A normal email planned for `june1` an hour before, for `check` at a time of the test's choosing.
func plannedEmail(timeZone: String = "UTC") -> RoutingV1.Delivery {
    var d = RoutingV1.Delivery()
    (d.channel, d.sendAtMs, d.createdAtMs, d.timeZone, d.urgency) = (.email, june1, june1 - hour, timeZone, .normal)
    return d
}

/// Runs the dispatcher while `body` runs.
func dispatching<T: Sendable>(_ service: RoutingService, _ body: @Sendable () async throws -> T) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await service.dispatcher.run(); return nil }
        let result = try await body()
        group.cancelAll()
        return result
    }
}

func now() -> Int64 { Int64(Date().timeIntervalSince1970 * 1000) }

/// Runs the dispatcher until `deliveries` are sent (events are reported on sent deliveries only).
func send(_ routing: RoutingService, _ deliveries: RoutingV1.Delivery...) async throws {
    try await dispatching(routing) {
        for d in deliveries { try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent } }
    }
}

/// Runs `body` with a routing service with `caps` (per day, per week, per channel per day,
/// per channel per week) and three deliveries of p's over the webhook, planned 25 hours apart
/// (so no cap holds one back when planned), then an hour more: an outage has kept all three,
/// now due together and late.
func withThreeLate(caps: (Int, Int, Int, Int), secondChannels: [CommonV1.Channel] = [.webhook], thirdNotAfter: Int64 = 0,
                   _ body: @Sendable (RoutingService, WebhookSink, TestClock, [RoutingV1.Delivery]) async throws -> Void) async throws {
    let clock = TestClock()
    clock.now.withLock { $0 = june1 }
    try await withRouting(clock: clock, configure: capped(caps)) { routing, profile, sink in
        try seedReachable(profile.store, "p", at: june1 - day)
        let first = try await routing.route(routeRequest("p", key: "late1", channels: [.webhook]))
        clock.advance(seconds: 25 * 3600)
        let second = try await routing.route(routeRequest("p", key: "late2", channels: secondChannels))
        clock.advance(seconds: 25 * 3600)
        let third = try await routing.route(routeRequest("p", key: "late3", channels: [.webhook], notAfter: thirdNotAfter))
        #expect([first, second, third].allSatisfy { $0.state == .scheduled && $0.channel == .webhook }, "\([first, second, third].map(\.suppressionDetail))")
        clock.advance(seconds: 3600)
        try await body(routing, sink, clock, [first, second, third])
    }
}

@Suite("routing: timing")
struct TimingTests {
    let quiet = QuietHours(start: "21:00", end: "08:00")!

    @Test("quiet hours end at 08:00 local across a DST change, both ways")
    func dst() {
        let newYork = LocalClock(TimeZone(identifier: "America/New_York")!)
        // 2026-03-08 01:30 EST (06:30 UTC); clocks jump to 03:00 EDT: 08:00 EDT is 12:00 UTC.
        #expect(newYork.leavingQuietHours(1_772_951_400_000, quiet) == 1_772_971_200_000)
        // 2026-11-01 01:30 EDT (05:30 UTC); clocks fall back to 01:00 EST: 08:00 EST is 13:00 UTC.
        #expect(newYork.leavingQuietHours(1_793_511_000_000, quiet) == 1_793_511_000_000 + 7 * hour + 30 * 60_000)
    }

    @Test("the same instant is quiet in one time zone and not in another")
    func zones() {
        for (zone, expected) in [("Europe/Paris", june1), ("Asia/Tokyo", june1), ("America/Los_Angeles", june1 + 5 * hour),
                                 ("Asia/Kolkata", june1)] {
            let clock = LocalClock(TimeZone(identifier: zone)!)
            #expect(SendTime.choose(start: june1, end: june1 + day, critical: false, clock: clock, quiet: quiet, bestHours: [], bestHoursSource: "")
                    == .at(expected, reason: expected == june1 ? "as soon as allowed" : "after quiet hours (\(zone))"), "\(zone)")
        }
        let la = LocalClock(TimeZone(identifier: "America/Los_Angeles")!)
        #expect(SendTime.choose(start: june1, end: june1 + hour, critical: true, clock: la, quiet: quiet, bestHours: [], bestHoursSource: "")
                == .at(june1, reason: "critical: as soon as allowed"))
        guard case .suppressed("quiet_hours", _) = SendTime.choose(start: june1, end: june1 + hour, critical: false, clock: la, quiet: quiet,
                                                                   bestHours: [], bestHoursSource: "") else {
            Issue.record("a window inside quiet hours must suppress")
            return
        }
        // Kolkata is UTC+05:30: its local hours do not start on UTC hours.
        let kolkata = LocalClock(TimeZone(identifier: "Asia/Kolkata")!)
        #expect(kolkata.nextInstant(inHour: 18, atOrAfter: june1) == june1 + 2 * hour + 30 * 60_000)
    }

    @Test("a best hour inside quiet hours is skipped for the next one")
    func bestHourSkipsQuiet() {
        let paris = LocalClock(TimeZone(identifier: "Europe/Paris")!)
        // Best hours 23 (quiet) then 18: 18:00 Paris is 16:00 UTC.
        #expect(SendTime.choose(start: june1, end: june1 + day, critical: false, clock: paris, quiet: quiet, bestHours: [23, 18], bestHoursSource: "person's")
                == .at(june1 + 6 * hour, reason: "person's best hour 18:00 (Europe/Paris)"))
        // A window too short for the best hour: as soon as allowed.
        #expect(SendTime.choose(start: june1, end: june1 + hour, critical: false, clock: paris, quiet: quiet, bestHours: [18], bestHoursSource: "person's")
                == .at(june1, reason: "as soon as allowed"))
        // 09:00 Paris the next day is 07:00 UTC.
        #expect(SendTime.choose(start: june1, end: june1 + day, critical: false, clock: paris, quiet: quiet, bestHours: [9], bestHoursSource: "population's")
                == .at(june1 + 21 * hour, reason: "population's best hour 09:00 (Europe/Paris)"))
    }

    @Test("explanations print numbers as %.Nf does")
    func decimals() {
        var generator = SplitMix64(seed: 7)
        for _ in 0..<10_000 {
            let value = (Double(generator.next() % 2_000_000) - 1_000_000) / Double([1, 7, 1000, 65_536][Int(generator.next() % 4)])
            for digits in [0, 1, 3] {
                let expected = String(format: "%.\(digits)f", value)
                // Exact ties may round either way; everything else must agree.
                let tie = abs((abs(value) * pow(10, Double(digits))).truncatingRemainder(dividingBy: 1) - 0.5) < 1e-9
                if !tie { #expect(decimal(value, digits) == expected, "\(value) with \(digits) digits") }
            }
        }
        #expect(decimal(0.1, 3) == "0.100" && decimal(-0.0004, 3) == "-0.000" && decimal(2.5e-3, 1) == "0.0" && decimal(12, 0) == "12")
    }
}

@Suite("routing: configuration")
struct ConfigurationTests {
    @Test("every key may be left out, nested ones too; a bad value is named")
    func decoding() throws {
        let decoded = try JSONDecoder().decode(RoutingConfiguration.self, from: Data("""
            {"webhook": {"url": "http://127.0.0.1:9000/hooks"}, "smtp": {"from": "a@example.com"}, "capPerDay": 5, "breakerFailures": 0}
            """.utf8))
        #expect(decoded.breakerFailures == 0 && decoded.breakerCooldownMs == 5000 && decoded.breakerMaxCooldownMs == 60_000)
        #expect(decoded.webhook == .init(url: "http://127.0.0.1:9000/hooks", secretFile: nil, timeoutMs: 5000))
        #expect(decoded.smtp?.port == 25 && decoded.smtp?.timeoutMs == 10_000 && decoded.capPerDay == 5 && decoded.capPerWeek == 10)
        for (json, named) in [(#"{"webhook": {"url": "ftp://x/"}}"#, "webhook.url"), (#"{"maxBackoffMs": 1}"#, "maxBackoffMs"),
                              (#"{"defaultTimeZone": "Mars/Olympus"}"#, "defaultTimeZone"), (#"{"smtp": {"from": "nobody"}}"#, "smtp.from"),
                              (#"{"breakerMaxCooldownMs": 1000}"#, "breakerMaxCooldownMs"), (#"{"breakerFailures": -1}"#, "breakerFailures")] {
            do {
                _ = try JSONDecoder().decode(RoutingConfiguration.self, from: Data(json.utf8))
                Issue.record("accepted \(json)")
            } catch {
                #expect("\(error)".contains(named), "\(error)")
            }
        }
    }
}

@Suite("routing service")
struct RoutingTests {
    @Test("every field is validated and named")
    func validation() async throws {
        try await withRouting(clock: TestClock()) { routing, _, _ in
            var r = routeRequest("p1", key: "k")
            r.person = nil
            await expectInvalid("person") { _ = try await routing.route(r) }
            await expectInvalid("idempotency_key") { _ = try await routing.route(routeRequest("p1", key: "")) }
            await expectInvalid("idempotency_key") { _ = try await routing.route(routeRequest("p1", key: "has space")) }
            await expectInvalid("purpose") { _ = try await routing.route(routeRequest("p1", key: "k", purpose: "")) }
            // A purpose SetConsent refuses (its opt-outs could not be passed on).
            await expectInvalid("purpose: \"news.sms\" ends in a channel name") { _ = try await routing.route(routeRequest("p1", key: "k", purpose: "news.sms")) }
            await expectInvalid("allowed_channels[1]") { _ = try await routing.route(routeRequest("p1", key: "k", channels: [.email, .email])) }
            await expectInvalid("allowed_channels[0]") { _ = try await routing.route(routeRequest("p1", key: "k", channels: [CommonV1.Channel(rawValue: 9)])) }
            await expectInvalid("not_after_ms") { _ = try await routing.route(routeRequest("p1", key: "k", notBefore: june1, notAfter: june1 - 1)) }
            // The planner adds the send window to these: Int64.max crashed the service.
            await expectInvalid("not_before_ms") { _ = try await routing.route(routeRequest("p1", key: "k", notBefore: .max)) }
            await expectInvalid("not_after_ms") { _ = try await routing.route(routeRequest("p1", key: "k", notAfter: .max)) }
            await expectInvalid("not_before_ms") { _ = try await routing.route(routeRequest("p1", key: "k", notBefore: -1)) }
            r = routeRequest("p1", key: "k")
            r.message = nil
            await expectInvalid("message") { _ = try await routing.route(r) }
            r = routeRequest("p1", key: "k")
            r.urgency = RoutingV1.Urgency(rawValue: 7)
            await expectInvalid("urgency") { _ = try await routing.route(r) }
            await expectInvalid("message.variables key") { _ = try await routing.route(routeRequest("p1", key: "k", variables: ["bad key": "x"])) }
            await expectInvalid("kind") { _ = try await routing.report(event("dl1", .sent)) }
            await expectInvalid("hard_bounce") { _ = try await routing.report(event("dl1", .opened, hard: true)) }
            await #expect(throws: RPCError.self) { _ = try await routing.route(routeRequest("nobody", key: "k")) }  // NOT_FOUND
        }
    }

    @Test("consent on a channel is the newer of its own record and the purpose's record for every channel")
    func governingConsentRecord() {
        let planner = Planner(configuration: RoutingConfiguration(), adapters: [])
        func record(_ channel: CommonV1.Channel, _ granted: Bool, at: Int64) -> ProfileV1.ConsentRecord {
            var record = ProfileV1.ConsentRecord()
            record.purpose = "marketing"
            record.channel = channel
            record.granted = granted
            record.source = "test"
            record.atMs = at
            return record
        }
        func refusal(_ channel: CommonV1.Channel, _ records: [ProfileV1.ConsentRecord]) -> String? {
            var profile = ProfileV1.ProfileView()
            profile.consent = records
            return planner.consentRefusal(channel, purpose: "marketing", profile: profile, person: Evidence())
        }
        // An email grant, then "no marketing at all": the later denial holds on email too.
        #expect(refusal(.email, [record(.email, true, at: 1000), record(.unspecified, false, at: 2000)])?.contains("denied") == true)
        // The other way round, the email grant is newer; other channels stay denied.
        let regranted = [record(.email, true, at: 2000), record(.unspecified, false, at: 1000)]
        #expect(refusal(.email, regranted) == nil)
        #expect(refusal(.sms, regranted)?.contains("denied") == true)
        #expect(refusal(.sms, [record(.email, true, at: 1000)]) == "no consent recorded for marketing.sms")
    }

    @Test("each suppression reason: no consent, denied, unverified, expired, quiet hours")
    func suppressions() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            try seed(profile.store, "none", traits: [("email", .string("a@example.com")), ("email_verified", .bool(true))], at: june1 - day)
            try seed(profile.store, "denied", traits: [("email", .string("b@example.com")), ("email_verified", .bool(true))],
                     consent: [("marketing", .email, false)], at: june1 - day)
            try seed(profile.store, "unverified", traits: [("email", .string("c@example.com"))], consent: [("marketing", .email, true)], at: june1 - day)
            try seedReachable(profile.store, "ok", at: june1 - day)
            try seedReachable(profile.store, "la", zone: "America/Los_Angeles", at: june1 - day)

            func reason(_ person: String, _ key: String, notAfter: Int64 = 0) async throws -> (String, String) {
                let d = try await routing.route(routeRequest(person, key: key, channels: [.email], notAfter: notAfter))
                return (d.state == .suppressed ? d.suppressionReason : "scheduled", d.suppressionDetail)
            }
            #expect(try await reason("none", "k1").0 == "no_consent")
            let denied = try await reason("denied", "k2")
            #expect(denied.0 == "no_consent" && denied.1.contains("denied"), "\(denied)")
            let unverified = try await reason("unverified", "k3")
            #expect(unverified.0 == "unreachable" && unverified.1.contains("not verified"), "\(unverified)")
            #expect(try await reason("ok", "k4", notAfter: june1 - 1000).0 == "expired")
            #expect(try await reason("la", "k5", notAfter: june1 + hour).0 == "quiet_hours")
            #expect(try await reason("ok", "k6").0 == "scheduled")
            // A suppressed delivery is kept: the same key answers the same delivery.
            let again = try await routing.route(routeRequest("none", key: "k1", channels: [.email]))
            #expect(again.state == .suppressed && again.suppressionReason == "no_consent")
            // Every candidate channel is explained.
            let all = try await routing.route(routeRequest("unverified", key: "k7"))
            #expect(all.channels.count == 5 && all.channels.allSatisfy { !$0.excluded.isEmpty && !$0.detail.isEmpty })
        }
    }

    @Test("caps per day and per week, overall and per channel; critical messages are not held back")
    func caps() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock, configure: {
            $0.capPerDay = 2
            $0.capPerWeek = 3
            $0.capPerChannelPerDay = 1
            $0.capPerChannelPerWeek = 5
        }) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: june1 - day)
            let first = try await routing.route(routeRequest("p", key: "c1", channels: [.email, .push]))
            let second = try await routing.route(routeRequest("p", key: "c2", channels: [.email, .push]))
            #expect(first.state == .scheduled && second.state == .scheduled)
            #expect(first.channel != second.channel, "one per channel per day: the second goes on the other channel")
            #expect(second.channels.contains { $0.channel == first.channel && $0.excluded == "capped" })
            let third = try await routing.route(routeRequest("p", key: "c3", channels: [.email, .push]))
            #expect(third.state == .suppressed && third.suppressionReason == "capped", "\(third.suppressionDetail)")
            let critical = try await routing.route(routeRequest("p", key: "c4", channels: [.email], critical: true))
            #expect(critical.state == .scheduled && critical.sendAtMs == june1)
            clock.advance(seconds: 36 * 3600)  // the next day: the day cap is free again, the week cap (3) is not
            let later = try await routing.route(routeRequest("p", key: "c5", channels: [.email, .push]))
            #expect(later.state == .suppressed && later.suppressionReason == "capped" && later.suppressionDetail.contains("7 days"), "\(later.suppressionDetail)")
        }
    }

    @Test("caps hold when messages go later than planned: each send is checked against the person's sends before it, one send per person at a time")
    func capsAtSendTime() async throws {
        try await withThreeLate(caps: (2, 100, 1, 100), secondChannels: [.webhook, .push]) { routing, sink, _, late in
            let (first, second, third) = (late[0], late[1], late[2])
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(third.deliveryId)?.state == .suppressed }
            }
            let (a, b, c) = (try #require(try routing.store.delivery(first.deliveryId)), try #require(try routing.store.delivery(second.deliveryId)),
                             try #require(try routing.store.delivery(third.deliveryId)))
            #expect(a.state == .sent && a.channel == .webhook)
            // One webhook delivery a day: the second falls back to push.
            #expect(b.state == .sent && b.channel == .push, "\(b.events.map(\.detail))")
            #expect(b.events.contains { $0.kind == .fellBack && $0.detail.contains("sent now, 2 within 24 hours (cap 1)") }, "\(b.events.map(\.detail))")
            // Two a day in all: the third is not sent.
            #expect(c.suppressionReason == "capped" && c.suppressionDetail == "sent now, 3 deliveries within 24 hours (cap 2)", "\(c.suppressionDetail)")
            #expect(sink.requests.count == 2)
        }
    }

    @Test("through the dispatcher: a late message over the overall caps with a not_after waits until the caps hold, then goes")
    func lateOverCapsWaitsAndGoes() async throws {
        // The third may go until four days after its plan.
        try await withThreeLate(caps: (2, 100, 5, 100), thirdNotAfter: june1 + 54 * hour + 4 * day) { routing, sink, clock, late in
            let (first, second, third) = (late[0], late[1], late[2])
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(second.deliveryId)?.state == .sent }
                try await waitFor { try routing.store.delivery(third.deliveryId)?.nextAttemptAtMs ?? 0 > clock.read() }
            }
            let waiting = try #require(try routing.store.delivery(third.deliveryId))
            // Not suppressed (before, it was `capped`): it waits until the first of the two sends
            // of the last hour leaves the 24 hours.
            #expect(waiting.state == .scheduled && waiting.nextAttemptAtMs == clock.read() + day, "\(waiting.events.map(\.detail))")
            #expect(try routing.store.delivery(first.deliveryId)?.state == .sent)
            clock.advance(seconds: 86_400)
            try await send(routing, waiting)
            #expect(sink.requests.count == 3)
        }
    }

    @Test("at send time an opt-out learned since the plan refuses, unless the consent read again was granted after it")
    func optOutAgainstNewerGrant() async throws {
        try await withRouting { routing, _, _ in
            var d = plannedEmail()
            d.purpose = "marketing"
            var evidence = Evidence()
            // Unsubscribed in 2024 (a's), learned now through a merge; granted again since.
            evidence.optOuts = [(purpose: "marketing", channel: CommonV1.Channel.email.rawValue, atMs: june1 - 400 * day, recordedAtMs: june1)]
            var grant = ProfileV1.ConsentRecord()
            (grant.purpose, grant.channel, grant.granted, grant.atMs) = ("marketing", .email, true, june1 - 30 * day)
            #expect(routing.store.check(d, evidence, consent: .read([grant]), nowMs: june1) == .send)  // before: refused
            // Not read again, or an opt-out after the grant: refused.
            guard case .refused = routing.store.check(d, evidence, nowMs: june1) else { Issue.record("sent unread"); return }
            evidence.optOuts[0].atMs = june1 - day
            guard case .refused = routing.store.check(d, evidence, consent: .read([grant]), nowMs: june1) else { Issue.record("sent after a newer opt-out"); return }
        }
    }

    @Test("at send time the address is read again with the consent: a changed email goes to the new address; one no longer verified falls back")
    func addressReadAgain() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock, configure: uncapped) { routing, profile, sink in
            for person in ["p", "q"] { try seedReachable(profile.store, person, at: june1 - day) }
            let moved = try await routing.route(routeRequest("p", key: "moved", channels: [.email, .push], notBefore: june1 + 2 * hour))
            let unverified = try await routing.route(routeRequest("q", key: "unverified", channels: [.email, .push], notBefore: june1 + 2 * hour))
            #expect(moved.state == .scheduled && moved.channel == .email && moved.address == "p@example.com")
            #expect(unverified.state == .scheduled && unverified.channel == .email)
            // Changed after the plan, before the send.
            try seed(profile.store, "p", traits: [("email", .string("p.new@example.com"))], at: june1 + hour)
            try seed(profile.store, "q", traits: [("email_verified", .bool(false))], at: june1 + hour)
            clock.advance(seconds: 2 * 3600)
            try await send(routing, moved)
            try await dispatching(routing) { try await waitFor { try routing.store.delivery(unverified.deliveryId)?.state == .sent } }

            let sentMoved = try #require(try routing.store.delivery(moved.deliveryId))
            #expect(sentMoved.channel == .email && sentMoved.address == "p.new@example.com", "\(sentMoved.address)")
            let bodies = sink.requests.map(\.bodyText)
            #expect(bodies.contains { $0.contains("p.new@example.com") } && !bodies.contains { $0.contains("\"p@example.com\"") }, "\(bodies)")
            // Before: sent to the address of the plan.
            let sentQ = try #require(try routing.store.delivery(unverified.deliveryId))
            #expect(sentQ.channel == .push && sentQ.address == "tok-q", "\(sentQ.channel) \(sentQ.address)")
            #expect(sentQ.events.contains { $0.kind == .fellBack && $0.detail.contains("email_verified is not true") && $0.detail.contains("read again before sending") },
                    "\(sentQ.events.map(\.detail))")
        }
    }

    @Test("a send on time is not checked against the caps again (daily messages planned a day apart to the millisecond); a late one is")
    func capsOnTimeAndLate() async throws {
        try await withRouting(configure: capped((5, 10, 1, 10))) { routing, _, _ in
            let d = plannedEmail(timeZone: "Europe/Paris")
            var evidence = Evidence()
            // Yesterday's sent 150 ms after its plan: on time, it counts at its planned instant
            // (a day before this one's), and this one on time is not checked again.
            evidence.contacts = [(CommonV1.Channel.email.rawValue, june1 - day)]
            #expect(routing.store.check(d, evidence, nowMs: june1 + 150) == .send)
            // Late by 10 minutes, it is: one sent 20 minutes after yesterday's plan (late, counted
            // then) shares a day with it.
            evidence.contacts = [(CommonV1.Channel.email.rawValue, june1 - day + 20 * 60_000)]
            #expect(routing.store.check(d, evidence, nowMs: june1 + 100) == .send)
            guard case .refused(let reason, _) = routing.store.check(d, evidence, nowMs: june1 + 10 * 60_000) else {
                Issue.record("a late send over the channel's cap went")
                return
            }
            #expect(reason == "capped")
        }
    }

    @Test("a late message over the overall caps waits for the first moment before its not_after at which they hold; without one in time it is capped")
    func lateOverCapsWaits() async throws {
        try await withRouting(configure: capped((2, 10, 5, 10))) { routing, _, _ in
            var d = plannedEmail()
            var evidence = Evidence()
            // Two sent 20 and 10 hours before, and one scheduled 30 hours after: sent now, 10
            // minutes late, it would be the third within 24 hours.
            evidence.contacts = [(CommonV1.Channel.webhook.rawValue, june1 - 20 * hour), (CommonV1.Channel.webhook.rawValue, june1 - 10 * hour),
                                 (CommonV1.Channel.webhook.rawValue, june1 + 30 * hour)]
            let now = june1 + 10 * 60_000
            guard case .capped = routing.store.check(d, evidence, nowMs: now) else {
                Issue.record("without not_after, a late message over the caps is not sent")
                return
            }
            // Valid two more days: it waits until the first of them leaves the window (before,
            // it was suppressed).
            d.notAfterMs = june1 + 2 * day
            guard case .later(let at, let why) = routing.store.check(d, evidence, nowMs: now) else {
                Issue.record("a late message that fits later within its not_after was not held")
                return
            }
            #expect(at == june1 + 4 * hour && why.hasPrefix("sent now, 3 deliveries within 24 hours (cap 2)"), "\(at) \(why)")
            #expect(routing.store.check(d, evidence, nowMs: at) == .send)
            // Valid only until before that moment: capped.
            d.notAfterMs = june1 + 3 * hour
            guard case .capped = routing.store.check(d, evidence, nowMs: now) else {
                Issue.record("a late message with no moment within the caps before its not_after was held")
                return
            }
            // The scheduled one counts too: no moment within a day of it holds a third.
            #expect(RoutingStore.firstWithinCaps([([june1 - 20 * hour, june1 + 10 * hour, june1 + 11 * hour], 2, 10)], after: june1, until: june1 + 2 * day)
                    == june1 + 34 * hour)
        }
    }

    @Test("a late message over its channel's caps falls back while it has a fallback; on its last channel it waits for the first moment before its not_after at which that channel's caps and the overall ones hold")
    func lateOverChannelCapsWaits() async throws {
        try await withRouting(configure: capped((5, 10, 1, 10))) { routing, _, _ in
            var d = plannedEmail()
            var evidence = Evidence()
            // An email 20 hours before and a webhook 10 hours before: sent now, 10 minutes late,
            // it would be the second email within 24 hours (cap 1); the overall cap holds.
            evidence.contacts = [(CommonV1.Channel.email.rawValue, june1 - 20 * hour), (CommonV1.Channel.webhook.rawValue, june1 - 10 * hour)]
            let now = june1 + 10 * 60_000
            d.notAfterMs = june1 + 2 * day
            d.fallbackChannels = [.push]
            guard case .refused("capped", _) = routing.store.check(d, evidence, nowMs: now) else {
                Issue.record("with a fallback left, a late message over its channel's cap did not fall back")
                return
            }
            // On its last channel it waits until the email leaves the 24 hours (before, it was
            // suppressed).
            d.fallbackChannels = []
            guard case .later(let at, let why) = routing.store.check(d, evidence, nowMs: now) else {
                Issue.record("a late message on its last channel that fits later within its not_after was not held")
                return
            }
            #expect(at == june1 + 4 * hour && why.hasPrefix("sent now, 2 within 24 hours (cap 1)"), "\(at) \(why)")
            #expect(routing.store.check(d, evidence, nowMs: at) == .send)
            // Without a not_after, or with one before that moment: refused (suppressed), as before.
            for notAfter in [0, june1 + 3 * hour] {
                d.notAfterMs = notAfter
                guard case .refused("capped", _) = routing.store.check(d, evidence, nowMs: now) else {
                    Issue.record("a late message over its channel's cap with no moment in time was held (not_after \(notAfter))")
                    return
                }
            }
        }
        // The moment keeps the overall caps too: the channel alone frees up in 4 hours, but two
        // contacts scheduled at 10 and 11 hours fill that day; 34 hours holds both.
        let channel: RoutingStore.CapLimit = ([june1 - 20 * hour], 1, 10), overall: RoutingStore.CapLimit = ([june1 + 10 * hour, june1 + 11 * hour], 2, 10)
        #expect(RoutingStore.firstWithinCaps([channel], after: june1, until: june1 + 3 * day) == june1 + 4 * hour)
        #expect(RoutingStore.firstWithinCaps([channel, overall], after: june1, until: june1 + 3 * day) == june1 + 34 * hour)
    }

    @Test("a late message that may wait until its not_after is judged with the contacts scheduled until a week past it")
    func lateContactsThroughNotAfter() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock, configure: uncapped) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: june1 - day)
            let far = try await routing.route(routeRequest("p", key: "far", channels: [.webhook], notBefore: june1 + 10 * day))
            #expect(far.state == .scheduled)
            func contacts(through: Int64) async throws -> [Int64] {
                try await routing.store.pool.read { db in
                    try RoutingStore.evidence(db, person: "p", engagement: false, contactsAround: june1, contactsThrough: through).contacts.map(\.atMs)
                }
            }
            // Before, only a week either side of now: a wait chosen at day 9 would not see it.
            #expect(try await contacts(through: 0).isEmpty)
            #expect(try await contacts(through: june1 + 12 * day) == [far.sendAtMs])
        }
    }

    @Test("the busiest window, in one pass, agrees with counting every window anew, duplicates and edges included")
    func busiestWindowAgainstCounting() {
        // Every window [s, s + length) holding t, counted directly.
        func counted(_ times: [Int64], _ t: Int64, _ length: Int64) -> Int {
            (times.filter { $0 > t - length && $0 <= t } + [t]).map { start in times.count { $0 >= start && $0 < start + length } }.max() ?? 0
        }
        var random = SplitMix64(seed: 35)
        for round in 0..<500 {
            let length = Int64(1 + random.int(100))
            let times = (0..<random.int(40)).map { _ in Int64(random.int(400)) - 200 }  // many equal, many at the edges
            let t = Int64(random.int(200)) - 100
            #expect(RoutingStore.busiestWindow(times, around: t, length: length) == counted(times, t, length), "round \(round): \(times) around \(t), \(length)")
        }
    }

    @Test("a cap holds over any window of its length: deliveries on both sides of the send time that no single window holds do not block it")
    func capWindows() async throws {
        // Before: everything within 24 hours either side counted, 3 here.
        #expect(RoutingStore.busiestWindow([-20 * hour, -19 * hour, 20 * hour], around: 0, length: day) == 2)
        #expect(RoutingStore.busiestWindow([-20 * hour, -19 * hour, 3 * hour], around: 0, length: day) == 3)
        #expect(RoutingStore.busiestWindow([-day, day], around: 0, length: day) == 0)  // windows are [s, s + 24 h)
        #expect(RoutingStore.busiestWindow([], around: 0, length: day) == 0)
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock, configure: capped((3, 100, 100, 100))) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: june1 - day)
            // Two deliveries this afternoon, one the morning after tomorrow.
            for (key, at) in [("w1", june1 + hour), ("w2", june1 + 2 * hour), ("w3", june1 + 45 * hour)] {
                #expect(try await routing.route(routeRequest("p", key: key, channels: [.webhook], notBefore: at)).state == .scheduled)
            }
            // Tomorrow morning: all three are within 24 hours of it, but any 24 hours holding it
            // hold two of them at most.
            let morning = try await routing.route(routeRequest("p", key: "w4", channels: [.webhook], notBefore: june1 + 22 * hour))
            #expect(morning.state == .scheduled, "\(morning.suppressionDetail)")
            // One more there fills a window: the 24 hours from this afternoon's first would hold four.
            let more = try await routing.route(routeRequest("p", key: "w5", channels: [.webhook], notBefore: june1 + 22 * hour))
            #expect(more.state == .suppressed && more.suppressionReason == "capped", "\(more.state)")
        }
    }

    @Test("send time: the person's best hour from their opens, else the population's")
    func sendTime() async throws {
        let clock = TestClock()
        try await withRouting(clock: clock, configure: {
            $0.capPerDay = 100
            $0.capPerWeek = 100
            $0.capPerChannelPerDay = 100
            $0.capPerChannelPerWeek = 100
            // Three opens, decayed over the days since, weigh a little under 3.
            $0.minPersonEngagements = 2
            $0.minPopulationEngagements = 2
        }) { routing, profile, _ in
            try seedReachable(profile.store, "paris", at: june1 - 10 * day)
            try seedReachable(profile.store, "utc", zone: "UTC", at: june1 - 10 * day)
            // Three opens at 19:10 Paris time (17:10 UTC) on three days.
            for i in 0..<3 {
                let opened = june1 - Int64(3 - i) * day + 7 * hour + 10 * 60_000
                clock.now.withLock { $0 = opened - hour }
                let d = try await routing.route(routeRequest("paris", key: "h\(i)", channels: [.email], critical: true))
                clock.now.withLock { $0 = opened + 2 * hour }
                _ = try await routing.report(event(d.deliveryId, .opened, at: opened))
                _ = try await routing.report(event(d.deliveryId, .opened, at: opened + hour))  // a second open of the same delivery counts once
            }
            clock.now.withLock { $0 = june1 }
            let planned = try await routing.route(routeRequest("paris", key: "next", channels: [.email]))
            #expect(planned.sendAtMs == june1 + 7 * hour, "19:00 Paris is 17:00 UTC: \(planned.sendTimeReason)")
            #expect(planned.sendTimeReason == "person's best hour 19:00 (Europe/Paris)")
            // A person without history gets the population's best hour (19 local), in their own zone.
            let fresh = try await routing.route(routeRequest("utc", key: "fresh", channels: [.email]))
            #expect(fresh.sendAtMs == june1 + 9 * hour && fresh.sendTimeReason.hasPrefix("population's"), "\(fresh.sendTimeReason)")
        }
    }

    @Test("concurrent duplicate Routes make one delivery and one send; a reused key with another request is refused")
    func idempotency() async throws {
        try await withRouting(configure: { $0.quietHoursStart = "00:00"; $0.quietHoursEnd = "00:00" }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            let ids = try await withThrowingTaskGroup(of: String.self) { group in
                for _ in 0..<16 {
                    group.addTask { try await routing.route(routeRequest("p", key: "same", channels: [.webhook], critical: true)).deliveryId }
                }
                return try await group.reduce(into: Set<String>()) { $0.insert($1) }
            }
            #expect(ids.count == 1)
            do {
                _ = try await routing.route(routeRequest("p", key: "same", channels: [.email], critical: true))
                Issue.record("a reused key with another request was accepted")
            } catch let error as RPCError {
                #expect(error.code == .alreadyExists && error.message.hasPrefix("idempotency_key"))
            }
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(ids.first!)?.state == .sent }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(sink.requests.count == 1)

            // With the profile service unreachable, a replay is still answered from the store;
            // a new key is not routed, and a reused key with another request is still refused.
            let down = RPCClient(host: "127.0.0.1", port: try await unusedPort())
            defer { down.close() }
            let blind = try RoutingService(store: routing.store, configuration: RoutingConfiguration(), profile: down,
                                           group: .singletonMultiThreadedEventLoopGroup, logger: quietLogger("routing-test"))
            #expect(try await blind.route(routeRequest("p", key: "same", channels: [.webhook], critical: true)).deliveryId == ids.first!)
            do {
                _ = try await blind.route(routeRequest("p", key: "new", channels: [.webhook], critical: true))
                Issue.record("a new key was routed without the profile service")
            } catch let error as RPCError {
                #expect(error.code == .unavailable)
            }
            do {
                _ = try await blind.route(routeRequest("p", key: "same", channels: [.email], critical: true))
                Issue.record("a reused key with another request was accepted while the profile was down")
            } catch let error as RPCError {
                #expect(error.code == .alreadyExists)
            }
            await blind.shutdown()
        }
    }

    @Test("a webhook receiver that sends its body a byte at a time holds a send no longer than the timeout: its 200 is a send")
    func webhookTricklingBodyTimed() async throws {
        try await withRouting(configure: { $0.webhook?.timeoutMs = 500 }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            sink.trickleBodies(true)
            let started = ContinuousClock.now
            let d = try await routing.route(routeRequest("p", key: "trickle", channels: [.webhook], critical: true))
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
            }
            // Before: the body's 1,000 bytes at one per 200 ms (each read within the timeout), 200 s.
            #expect(ContinuousClock.now - started < .seconds(30))
            #expect(sink.answered == 1)
        }
    }

    @Test("a webhook that redirects is not delivered to: the redirect is not followed (it would repeat the POST as a GET without its body)")
    func webhookRedirectIsNotDelivery() async throws {
        try await withRouting(configure: { $0.maxAttempts = 3 }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            sink.fail(next: 1, status: 302, location: "http://127.0.0.1:\(sink.port)/moved")
            let d = try await routing.route(routeRequest("p", key: "rd", channels: [.webhook], critical: true))
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId).map { $0.state != .scheduled && $0.state != .sending } ?? false }
            }
            let done = try #require(try routing.store.delivery(d.deliveryId))
            // Before, the client followed with a GET, which the sink answered 200: SENT, with
            // nothing delivered.
            #expect(done.state == .deadLetter && done.lastError.hasPrefix("webhook: HTTP 302, redirected to http://127.0.0.1"), "\(done.state) \(done.lastError)")
            #expect(sink.requests.isEmpty && sink.answered == 1)
        }
    }

    @Test("retries with backoff, then a dead letter with the last error; RetryDeadLetter replays; the webhook is signed")
    func deadLetter() async throws {
        let secret = temporaryDirectory("routing-secret") + "/secret"
        _ = FileManager.default.createFile(atPath: secret, contents: Data("s3cret\n".utf8))
        try await withRouting(secretFile: secret, configure: { $0.maxAttempts = 3 }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            sink.fail(next: 3, status: 503)
            let d = try await routing.route(routeRequest("p", key: "dl", channels: [.webhook], critical: true))
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .deadLetter }
            }
            let dead = try #require(try routing.store.delivery(d.deliveryId))
            #expect(dead.attempts == 3 && dead.lastError == "webhook: HTTP 503")
            #expect(dead.events.filter { $0.kind == .attemptFailed }.count == 3 && dead.events.last?.kind == .deadLettered)
            #expect(sink.answered == 3 && sink.requests.isEmpty)

            #expect(throws: RPCError.self) { _ = try routing.retryDeadLetter(RoutingV1.RetryDeadLetterRequest.with("missing")) }
            let requeued = try routing.retryDeadLetter(.with(d.deliveryId))
            #expect(requeued.state == .scheduled && requeued.attempts == 0)
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
            }
            let request = try #require(sink.requests.first)
            #expect(request.headers["idempotency-key"] == "dl:webhook")
            let body = try #require(try JSONSerialization.jsonObject(with: Data(request.body)) as? [String: Any])
            #expect(body["template_id"] as? String == "welcome" && body["channel"] as? String == "webhook" && body["person_id"] as? String == "p")
            // X-Arbiter-Signature: t=<seconds>,v1=<hex HMAC-SHA256("<t>." + body)>
            let signature = try #require(request.headers["x-arbiter-signature"])
            let parts = Dictionary(uniqueKeysWithValues: signature.split(separator: ",").map { $0.split(separator: "=", maxSplits: 1).map(String.init) }.map { ($0[0], $0[1]) })
            let mac = HMAC<SHA256>.authenticationCode(for: Data("\(parts["t"]!).".utf8) + Data(request.body), using: SymmetricKey(data: Data("s3cret".utf8)))
            #expect(parts["v1"] == mac.map { String(format: "%02x", $0) }.joined())
            // A delivery that is not a dead letter cannot be replayed.
            do {
                _ = try routing.retryDeadLetter(.with(d.deliveryId))
                Issue.record("replayed a sent delivery")
            } catch let error as RPCError {
                #expect(error.code == .failedPrecondition)
            }
        }
    }

    @Test("an outage of the webhook opens its circuit: deliveries wait without spending attempts, one probe at a time, and all go once it recovers; without the circuit they dead-letter")
    func circuitBreakerTimed() async throws {
        for threshold in [3, 0] {
            try await withRouting(configure: {
                $0.maxAttempts = 3
                // A retry no sooner than 50 ms: the 5 first attempts fail before any is retried.
                $0.initialBackoffMs = 100
                $0.maxBackoffMs = 200
                $0.breakerFailures = threshold
                $0.breakerCooldownMs = 10
                $0.breakerMaxCooldownMs = 40
            }) { routing, profile, sink in
                // Five persons: the dispatcher sends one message per person at a time.
                for k in 0..<5 { try seedReachable(profile.store, "p\(k)", at: now() - day) }
                // Down for 20 requests: with the circuit, 3 fail in a row and open it; the rest
                // are probes, one at a time, none counted against its delivery.
                sink.fail(next: 20, status: 503)
                var routed: [String] = []
                for k in 0..<5 { routed.append(try await routing.route(routeRequest("p\(k)", key: "cb\(k)", channels: [.webhook], critical: true)).deliveryId) }
                let ids = routed
                try await dispatching(routing) {
                    try await waitFor {
                        try ids.allSatisfy { [.sent, .deadLetter].contains(try routing.store.delivery($0)?.state) }
                    }
                }
                let deliveries = try ids.map { try #require(try routing.store.delivery($0)) }
                if threshold > 0 {
                    #expect(deliveries.allSatisfy { $0.state == .sent }, "\(deliveries.map(\.state))")
                    #expect(sink.answered == 25 && sink.requests.count == 5)
                    // Only the failures before the circuit opened count: the 5 first attempts (all
                    // in flight at once), and at most 2 retries on a slow machine before the 3rd
                    // failure in a row was recorded. Every other failure was an uncounted probe.
                    let counted = deliveries.map(\.attempts).reduce(0, +) - 5
                    #expect((5...7).contains(counted), "\(deliveries.map(\.attempts))")
                    let probes = deliveries.flatMap(\.events).filter { $0.kind == .attemptFailed && $0.detail.hasSuffix("(a probe while the circuit was open: not counted as an attempt)") }
                    #expect(probes.count == 20 - Int(counted))
                } else {
                    // Each delivery spent its 3 attempts within the outage.
                    #expect(deliveries.allSatisfy { $0.state == .deadLetter && $0.attempts == 3 }, "\(deliveries.map(\.state))")
                    #expect(sink.answered == 15 && sink.requests.isEmpty)
                }
            }
        }
    }

    @Test("ListDeliveries stops a page at 2 MiB of records, and the next page goes on from there")
    func listDeliveriesBySize() async throws {
        try await withRouting { routing, profile, _ in
            try seedReachable(profile.store, "p", at: now() - day)
            // Five deliveries of ~640 KB each (40 variables of 16 KiB): three fit in a page.
            let big = Dictionary(uniqueKeysWithValues: (0..<40).map { ("v\($0)", String(repeating: "x", count: 16 << 10)) })
            var ids: [String] = []
            for i in 0..<5 { ids.append(try await routing.route(routeRequest("p", key: "big\(i)", channels: [.webhook], variables: big)).deliveryId) }
            var request = RoutingV1.ListDeliveriesRequest()
            request.personId = "p"
            request.limit = 100
            let first = try routing.listDeliveries(request)
            #expect(first.deliveries.map(\.deliveryId) == Array(ids.reversed().prefix(3)) && first.nextPageToken == ids[2])
            request.pageToken = first.nextPageToken
            let second = try routing.listDeliveries(request)
            #expect(second.deliveries.map(\.deliveryId) == [ids[1], ids[0]] && second.nextPageToken.isEmpty)
            // Exactly at the limit, with none after: no next page.
            request.pageToken = ""
            request.limit = 1
            let one = try routing.listDeliveries(request)
            #expect(one.deliveries.count == 1 && one.nextPageToken == ids[4])
        }
    }

    @Test("ListDeliveries pages a person's deliveries and every dead letter, newest first; each can be replayed; bad requests name the field")
    func listDeadLetters() async throws {
        try await withRouting(configure: { $0.maxAttempts = 1; $0.breakerFailures = 0 }) { routing, profile, sink in
            for person in ["p", "q"] { try seedReachable(profile.store, person, at: now() - day) }
            sink.fail(next: 4, status: 503)
            var routed: [String] = []
            for (k, person) in ["p", "q", "p", "q"].enumerated() {
                let id = try await routing.route(routeRequest(person, key: "dead\(k)", channels: [.webhook], critical: true)).deliveryId
                routed.append(id)
                try await dispatching(routing) { try await waitFor { try routing.store.delivery(id)?.state == .deadLetter } }
            }
            let sent = try await routing.route(routeRequest("p", key: "alive", channels: [.webhook], critical: true))
            try await dispatching(routing) { try await waitFor { try routing.store.delivery(sent.deliveryId)?.state == .sent } }
            func list(person: String = "", state: RoutingV1.Delivery.State = .init(rawValue: 0), limit: UInt32 = 0, token: String = "") throws -> RoutingV1.ListDeliveriesResponse {
                var request = RoutingV1.ListDeliveriesRequest()
                request.personId = person
                request.state = state
                request.limit = limit
                request.pageToken = token
                return try routing.listDeliveries(request)
            }
            // Every dead letter, newest first, in pages of 3.
            let first = try list(state: .deadLetter, limit: 3)
            #expect(first.deliveries.map(\.deliveryId) == routed.reversed().prefix(3).map { $0 } && !first.nextPageToken.isEmpty)
            let second = try list(state: .deadLetter, limit: 3, token: first.nextPageToken)
            #expect(second.deliveries.map(\.deliveryId) == [routed[0]] && second.nextPageToken.isEmpty)
            #expect(try list(person: "p", state: .deadLetter).deliveries.map(\.deliveryId) == [routed[2], routed[0]])
            let all = try list(person: "p", limit: 2)
            #expect(all.deliveries.map(\.deliveryId) == [sent.deliveryId, routed[2]] && all.nextPageToken == routed[2])
            #expect(try list(person: "p", limit: 2, token: all.nextPageToken).deliveries.map(\.deliveryId) == [routed[0]])
            // Replayed, they leave the list.
            for delivery in first.deliveries + second.deliveries { _ = try routing.retryDeadLetter(.with(delivery.deliveryId)) }
            #expect(try list(state: .deadLetter).deliveries.isEmpty)
            for (request, field) in [({ try list() }, "person_id"), ({ try list(state: .sent) }, "person_id"),
                                     ({ try list(state: .init(rawValue: 9)) }, "state"), ({ try list(person: "p", limit: 1001) }, "limit"),
                                     ({ try list(person: "p", token: "not a token") }, "page_token"), ({ try list(person: "p", token: "zzz") }, "page_token"),
                                     ({ try list(person: "p", state: .init(rawValue: 2)) }, "state")] as [(() throws -> RoutingV1.ListDeliveriesResponse, String)] {
                do {
                    _ = try request()
                    Issue.record("accepted a request without a valid \(field)")
                } catch let error as RPCError {
                    #expect(error.code == .invalidArgument && error.message.hasPrefix(field), "\(error)")
                }
            }
        }
    }

    @Test("outboxRetentionDays: deliveries done (sent, suppressed, dead letters) go with their events once past it; scheduled and recent ones stay; it is 0 or at least 30")
    func outboxRetention() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock, configure: { $0.maxAttempts = 1; $0.breakerFailures = 0 }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: june1 - day)
            let sent = try await routing.route(routeRequest("p", key: "old-sent", channels: [.webhook], critical: true))
            try await send(routing, sent)
            _ = try await routing.report(event(sent.deliveryId, .opened))
            let suppressed = try await routing.route(routeRequest("p", key: "old-suppressed", channels: [.sms]))  // no consent on sms
            #expect(suppressed.state == .suppressed)
            sink.fail(next: 1, status: 503)
            let dead = try await routing.route(routeRequest("p", key: "old-dead", channels: [.webhook], critical: true))
            try await dispatching(routing) { try await waitFor { try routing.store.delivery(dead.deliveryId)?.state == .deadLetter } }
            let later = try await routing.route(routeRequest("p", key: "later", channels: [.webhook], notBefore: june1 + 40 * day, notAfter: june1 + 41 * day))
            #expect(later.state == .scheduled)
            clock.advance(seconds: 31 * 86_400)
            let recent = try await routing.route(routeRequest("p", key: "recent", channels: [.webhook], critical: true))
            try await send(routing, recent)

            func events(_ d: RoutingV1.Delivery) async throws -> Int {
                try await routing.store.pool.read { try Int.fetchOne($0, sql: "SELECT count(*) FROM delivery_event WHERE delivery_id = ?", arguments: [d.deliveryId]) ?? 0 }
            }
            #expect(try await events(sent) == 1)  // the open reported
            let pruner = routing.store.pruner(retentionDays: 30, batch: 2, logger: quietLogger("routing-test"), clock: clock.read)
            #expect(await pruner.pruneOnce() == 3)  // in two batches
            for gone in [sent, suppressed, dead] {
                #expect(try routing.store.delivery(gone.deliveryId) == nil, "\(gone.idempotencyKey)")
                #expect(try await events(gone) == 0)
            }
            // Planned 40 days ahead, routed 31 days ago: still to be sent.
            #expect(try routing.store.delivery(later.deliveryId)?.state == .scheduled)
            #expect(try routing.store.delivery(recent.deliveryId)?.state == .sent)
            #expect(await pruner.pruneOnce() == 0)
        }
        for (json, accepted) in [(#"{"outboxRetentionDays": 29}"#, false), (#"{"outboxRetentionDays": 30}"#, true), (#"{"outboxRetentionDays": 0}"#, true)] {
            do {
                _ = try JSONDecoder().decode(RoutingConfiguration.self, from: Data(json.utf8))
                #expect(accepted, "accepted \(json)")
            } catch {
                #expect(!accepted && "\(error)".contains("outboxRetentionDays must be between 30"), "\(error)")
            }
        }
    }

    @Test("the outbox's due deliveries, oldest first, leave out the channels a circuit holds")
    func dueSkipsHeldChannels() async throws {
        try await withRouting { routing, profile, _ in
            try seedReachable(profile.store, "p", at: now() - day)
            var routed: [(String, CommonV1.Channel)] = []
            for (k, channel) in [CommonV1.Channel.webhook, .push, .webhook, .email].enumerated() {
                routed.append((try await routing.route(routeRequest("p", key: "due\(k)", channels: [channel], critical: true)).deliveryId, channel))
                try await Task.sleep(for: .milliseconds(2))  // distinct due times
            }
            let later = now() + 60_000
            func due(skipping: Set<CommonV1.Channel>, limit: Int = 10) throws -> [String] {
                try routing.store.due(nowMs: later, limit: limit, skipping: skipping).map(\.deliveryId)
            }
            #expect(try due(skipping: []) == routed.map(\.0))
            #expect(try due(skipping: [.push]) == routed.filter { $0.1 != .push }.map(\.0))
            #expect(try due(skipping: [.webhook, .email]) == [routed[1].0])
            #expect(try due(skipping: [.push], limit: 2) == [routed[0].0, routed[2].0])
            #expect(try due(skipping: Set(Planner.allChannels)).isEmpty)
        }
    }

    @Test("a 503 or 429 with Retry-After waits at least that long before the next attempt (up to maxBackoffMs)")
    func retryAfterTimed() async throws {
        try await withRouting(configure: { $0.maxBackoffMs = 60_000 }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            sink.fail(next: 1, status: 429, retryAfter: "2")
            let d = try await routing.route(routeRequest("p", key: "ra", channels: [.webhook], critical: true))
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.attempts == 1 }
            }
            let waiting = try #require(try routing.store.delivery(d.deliveryId))
            let failed = try #require(waiting.events.last { $0.kind == .attemptFailed })
            #expect(waiting.state == .scheduled && failed.detail == "webhook: HTTP 429")
            // 2 s asked for; without it the wait was 5–10 ms (initialBackoffMs 5).
            #expect(waiting.nextAttemptAtMs - failed.atMs >= 2000, "\(waiting.nextAttemptAtMs - failed.atMs) ms")
        }
    }

    @Test("Retry-After: delay seconds or an HTTP date; anything else ignored")
    func retryAfterParsing() {
        let now = Date(timeIntervalSince1970: 1_780_308_000)  // Mon, 01 Jun 2026 10:00:00 GMT
        #expect(WebhookAdapter.retryAfterMs("120", now: now) == 120_000)
        #expect(WebhookAdapter.retryAfterMs(" 0 ", now: now) == 0)
        #expect(WebhookAdapter.retryAfterMs("Mon, 01 Jun 2026 10:00:30 GMT", now: now) == 30_000)
        #expect(WebhookAdapter.retryAfterMs("Mon, 01 Jun 2026 09:00:00 GMT", now: now) == 0)
        for junk in [nil, "", "-5", "1.5", "soon", "٣"] { #expect(WebhookAdapter.retryAfterMs(junk, now: now) == nil, "\(String(describing: junk))") }
        #expect(WebhookAdapter.retryAfterMs("99999999999999999999", now: now) == nil)
    }

    @Test("circuit: opens after the failures in a row, admits one probe after the cooldown, doubles it per failed probe up to the maximum, closes on an answer; a stale probe counts as an ordinary attempt")
    func circuitStates() throws {
        let breakers = CircuitBreakers(threshold: 2, initialCooldownMs: 100, maxCooldownMs: 300)
        func fail(_ token: Int? = nil, at t: Int64, retryAfter: Int64? = nil) -> (wasProbe: Bool, transition: CircuitBreakers.Transition?) {
            breakers.record("webhook", probe: token, transient: true, retryAfterMs: retryAfter, nowMs: t)
        }
        func answer(_ token: Int? = nil, at t: Int64) -> (wasProbe: Bool, transition: CircuitBreakers.Transition?) {
            breakers.record("webhook", probe: token, transient: false, retryAfterMs: nil, nowMs: t)
        }
        func probeToken(at t: Int64) throws -> Int {
            guard case .probe(let token) = breakers.admit("webhook", nowMs: t) else { throw RPCError(.internal, "no probe admitted at \(t)") }
            return token
        }
        #expect(fail(at: 0).transition == nil)
        #expect(answer(at: 1).transition == nil)  // an answer breaks the run
        #expect(fail(at: 2).transition == nil)
        #expect(fail(at: 10).transition == .opened(failures: 2, forMs: 100))
        #expect(breakers.held(nowMs: 50) == ["webhook"] && breakers.admit("webhook", nowMs: 50) == .wait)
        #expect(breakers.admit("smtp", nowMs: 50) == .send)  // each adapter has its own circuit
        #expect(breakers.held(nowMs: 110).isEmpty)
        let first = try probeToken(at: 110)
        #expect(breakers.admit("webhook", nowMs: 111) == .wait && breakers.held(nowMs: 111) == ["webhook"])  // one probe at a time
        breakers.release("webhook", token: first)  // not sent after all
        let second = try probeToken(at: 112)
        breakers.release("webhook", token: first)  // a stale release leaves the current probe alone
        #expect(breakers.admit("webhook", nowMs: 113) == .wait)
        #expect(fail(second, at: 120) == (true, .reopened(forMs: 200)))
        #expect(breakers.admit("webhook", nowMs: 319) == .wait)
        #expect(fail(try probeToken(at: 320), at: 330) == (true, .reopened(forMs: 300)))
        #expect(fail(try probeToken(at: 630), at: 640) == (true, .reopened(forMs: 300)))  // at most the maximum
        #expect(answer(try probeToken(at: 940), at: 950) == (true, .closed))
        #expect(breakers.admit("webhook", nowMs: 951) == .send && breakers.held(nowMs: 951).isEmpty)
        // Open again; a probe goes; an attempt sent before the circuit opened then succeeds and
        // closes it. The probe's failure afterwards is an ordinary one: counted against its
        // delivery, one of a new run, no cooldown of 0.
        _ = fail(at: 1000)
        #expect(fail(at: 1000, retryAfter: 250).transition == .opened(failures: 2, forMs: 250))  // Retry-After lengthens it
        let stale = try probeToken(at: 1250)
        #expect(answer(at: 1251) == (false, .closed))
        #expect(fail(stale, at: 1260) == (false, nil))
        #expect(breakers.admit("webhook", nowMs: 1261) == .send)
        // Threshold 0: never open.
        let never = CircuitBreakers(threshold: 0, initialCooldownMs: 100, maxCooldownMs: 300)
        for t in 0..<10 { #expect(never.record("webhook", probe: nil, transient: true, retryAfterMs: nil, nowMs: Int64(t)) == (false, nil)) }
        #expect(never.admit("webhook", nowMs: 10) == .send)
    }

    @Test("a message's variables cannot end the SMTP DATA early or add commands: every CR, LF or CRLF breaks a line, and lines are dot-stuffed")
    func smtpBodyCannotInject() {
        var delivery = RoutingV1.Delivery()
        delivery.deliveryId = "dl1"
        delivery.address = "p@example.com"
        var message = RoutingV1.Message()
        message.templateId = "t"
        // "\r\r\n" holds no "\n" as Swift characters ("\r\n" is one): before, it passed whole.
        message.variables = ["body": "hi\r\r\n.\r\r\nMAIL FROM:<ceo@bank>\r\r\nRCPT TO:<x@y>\rDATA\n.\nend"]
        delivery.message = message
        let wire = SMTPAdapter.message(delivery, from: "arbiter@example.com", date: Date(timeIntervalSince1970: 0))
        #expect(wire.hasSuffix("\r\n.\r\n"))
        // The only end of DATA is the last; no CR or LF outside a CRLF.
        #expect(wire.ranges(of: "\r\n.\r\n").count == 1, "\(wire.debugDescription)")
        let bytes = Array(wire.utf8)
        let cr = UInt8(ascii: "\r"), lf = UInt8(ascii: "\n")
        for i in bytes.indices {
            if bytes[i] == cr { #expect(i + 1 < bytes.count && bytes[i + 1] == lf, "a bare CR at \(i)") }
            if bytes[i] == lf { #expect(i > 0 && bytes[i - 1] == cr, "a bare LF at \(i)") }
        }
        let body = wire[wire.range(of: "\r\n\r\n")!.upperBound...]  // after the headers
        #expect(body.components(separatedBy: "\r\n").filter { $0.hasPrefix(".") } == ["..", "..", "."], "\(body.debugDescription)")
        #expect(SMTPAdapter.bodyLines("a\r\nb\rc\nd\r\r\ne") == ["a", "b", "c", "d", "", "e"])
    }

    @Test("fallback chain: a permanent failure on push moves the delivery to email over a real SMTP server; a hard bounce too")
    func fallbackAndSMTP() async throws {
        try await withSMTPServer(failFirst: 2) { port, directory in
            try await withRouting(smtpPort: port, configure: { $0.quietHoursStart = "00:00"; $0.quietHoursEnd = "00:00"; $0.maxAttempts = 5 }) { routing, profile, sink in
                try seedReachable(profile.store, "p", at: now() - day)
                sink.fail(next: 1, status: 410)
                let d = try await routing.route(routeRequest("p", key: "fb", channels: [.push, .email], critical: true))
                #expect(d.channel == .push && d.fallbackChannels == [.email] && d.address == "tok-p")
                try await dispatching(routing) {
                    try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
                }
                let sent = try #require(try routing.store.delivery(d.deliveryId))
                #expect(sent.channel == .email && sent.address == "p@example.com")
                #expect(sent.events.map(\.kind).contains(.fellBack))
                // The SMTP server refused twice (451) before accepting: three attempts on email.
                #expect(sent.attempts == 3, "\(sent.events.map(\.detail))")
                let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".eml") }
                #expect(files.count == 1)
                let mail = try String(contentsOfFile: directory + "/" + files[0], encoding: .utf8)
                #expect(mail.contains("Subject: Hello") && mail.contains("X-Arbiter-Idempotency-Key: fb:email") && mail.contains("X-Envelope-To: p@example.com"))
                #expect(mail.contains("\n.line two"), "dot-stuffing is undone by the server: \(mail)")

                // A hard bounce on push marks the token unreachable and sends on email instead.
                let second = try await routing.route(routeRequest("p", key: "fb2", channels: [.push, .email], critical: true))
                try await dispatching(routing) {
                    try await waitFor { try routing.store.delivery(second.deliveryId)?.state == .sent }
                    let bounced = try await routing.report(event(second.deliveryId, .bounced, hard: true))
                    #expect(bounced.state == .scheduled && bounced.channel == .email)
                    try await waitFor { try routing.store.delivery(second.deliveryId)?.state == .sent }
                }
                let third = try await routing.route(routeRequest("p", key: "fb3", channels: [.push], critical: true))
                #expect(third.state == .suppressed && third.suppressionReason == "unreachable" && third.suppressionDetail.contains("hard-bounced"))
            }
        }
    }

    @Test("an attempt whose result cannot be recorded (another writer holds the store) is not sent again meanwhile; it is recorded once the store takes writes")
    func unrecordedAttemptNotResent() async throws {
        try await withRouting(configure: uncapped) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            let d = try await routing.route(routeRequest("p", key: "held", channels: [.webhook], critical: true))
            let release = try await holdWriteLock(routing.store.pool.path)
            defer { release() }
            try await dispatching(routing) {
                try await waitFor { sink.requests.count == 1 }
                // Recording waits 5 s for the lock (SQLite's busy timeout), fails, and is tried
                // again; the dispatcher polls every 50 ms all the while. Before, it sent again
                // at the first poll after each failure.
                try await Task.sleep(for: .seconds(6))
                #expect(sink.requests.count == 1)
                release()
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
            }
            #expect(sink.requests.count == 1)
        }
    }

    @Test("a hard bounce reported while the send is under way (before its result is recorded) still moves the delivery to its fallback")
    func bounceDuringSend() async throws {
        try await withRouting(configure: uncapped) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: now() - day)
            let d = try await routing.route(routeRequest("p", key: "race", channels: [.push, .email], critical: true))
            // The receiver reports the bounce before it answers the send.
            _ = try await routing.report(event(d.deliveryId, .bounced, hard: true))
            let recorded = try #require(try await routing.store.record(.init(deliveryID: d.deliveryId, channel: .push, result: .sent, atMs: now(), backoffMs: 0)))
            #expect(recorded.state == .scheduled && recorded.channel == .email, "\(recorded.events.map(\.detail))")
            #expect(recorded.events.map(\.kind).suffix(2) == [.sent, .fellBack])
        }
    }

    @Test("a fallback posted to the same webhook has its own Idempotency-Key (<key>:<channel>): a receiver that drops repeated keys keeps it")
    func fallbackKeyPerChannel() async throws {
        try await withRouting(configure: { $0.quietHoursStart = "00:00"; $0.quietHoursEnd = "00:00" }) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: now() - day)
            // No SMTP relay: email goes to the webhook too.
            let d = try await routing.route(routeRequest("p", key: "k1", channels: [.push, .email], critical: true))
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
                _ = try await routing.report(event(d.deliveryId, .bounced, hard: true))
                try await waitFor { try routing.store.delivery(d.deliveryId).map { $0.channel == .email && $0.state == .sent } ?? false }
            }
            #expect(sink.requests.count == 2 && sink.distinctKeys == ["k1:push", "k1:email"], "\(sink.distinctKeys)")
            // The body still names the client's key.
            #expect(sink.requests.allSatisfy { $0.bodyText.contains("\"idempotency_key\":\"k1\"") })
        }
    }

    @Test("an unsubscribe revokes consent in the profile service and is honoured at once; events count once")
    func unsubscribe() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: june1 - day)
            let d = try await routing.route(routeRequest("p", key: "u1", channels: [.email], critical: true))
            try await send(routing, d)
            clock.advance(seconds: 60)
            let after = try await routing.report(event(d.deliveryId, .unsubscribed))
            let again = try await routing.report(event(d.deliveryId, .unsubscribed))
            #expect(after.events.map(\.kind) == [.sent, .unsubscribed] && again.events.count == 2)
            var consent = ProfileV1.GetConsentRequest()
            consent.person = personRef("p")
            let current = try await profile.getConsent(consent).current.first { $0.purpose == "marketing" && $0.channel == .email }
            #expect(current?.granted == false && current?.source == "routing:unsubscribe")
            let next = try await routing.route(routeRequest("p", key: "u2", channels: [.email], critical: true))
            #expect(next.state == .suppressed && next.suppressionReason == "no_consent")
            // Other channels are untouched.
            #expect(try await routing.route(routeRequest("p", key: "u3", channels: [.push], critical: true)).state == .scheduled)
        }
    }

    @Test("a late report of an older unsubscribe neither replaces nor passes on a newer one")
    func olderUnsubscribeKeepsNewer() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: june1 - day)
            let d1 = try await routing.route(routeRequest("p", key: "o1", channels: [.email], critical: true))
            let d2 = try await routing.route(routeRequest("p", key: "o2", channels: [.email], critical: true))
            try await send(routing, d1, d2)
            let now = clock.read()
            let newer = try #require(try routing.store.report(d2.deliveryId, kind: .unsubscribed, hardBounce: false, atMs: now - 1_000, nowMs: now))
            #expect(newer.1?.atMs == now - 1_000)
            let older = try #require(try routing.store.report(d1.deliveryId, kind: .unsubscribed, hardBounce: false, atMs: now - 60_000, nowMs: now))
            #expect(older.1 == nil)  // nothing new to pass on
            // Before, INSERT OR REPLACE put the older time in: the newer denial, not yet passed
            // on, was lost, and the planner could read a later re-grant as newer than it.
            let stored = try await routing.store.pool.read { try Row.fetchAll($0, sql: "SELECT at_ms, synced FROM opt_out WHERE person_id = 'p'") }
            #expect(stored.map { [$0[0] as Int64, $0[1] as Int64] } == [[now - 1_000, 0]])
        }
    }

    @Test("a due delivery is judged again: an unsubscribe or a hard bounce since it was planned moves it along its chain or stops it; quiet hours and not_after hold at send time")
    func judgedWhenDue() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }  // noon in Paris
        try await withRouting(clock: clock, configure: uncapped) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: june1 - day)
            let store = routing.store
            func stored(_ d: RoutingV1.Delivery) throws -> RoutingV1.Delivery { try #require(try store.delivery(d.deliveryId)) }
            // Sent already: the person will unsubscribe from the email and the push token bounce.
            let email = try await routing.route(routeRequest("p", key: "k0e", channels: [.email], critical: true))
            let push = try await routing.route(routeRequest("p", key: "k0p", channels: [.push], critical: true))
            try await send(routing, email, push)
            let first = try await routing.route(routeRequest("p", key: "k1", channels: [.email], critical: true))
            let second = try await routing.route(routeRequest("p", key: "k2", channels: [.email, .push]))
            let third = try await routing.route(routeRequest("p", key: "k3", channels: [.push, .webhook], critical: true))
            #expect(second.state == .scheduled && second.channel == .email && second.sendAtMs == june1)
            clock.advance(seconds: 60)
            // Reported a minute after planning, though it happened ten minutes before: what counts
            // is when this service learned it (before, its time was compared, and it was ignored).
            _ = try await routing.report(event(email.deliveryId, .unsubscribed, at: june1 - 600_000))
            let at = june1 + 61_000

            // Planned before the unsubscribe: email is refused now, push is its fallback.
            let moved = try #require(try store.beforeSending(second, nowMs: at))
            #expect(moved.channel == .push && moved.address == "tok-p" && moved.state == .scheduled)
            #expect(try stored(second).events.last.map { $0.kind == .fellBack && $0.detail.contains("unsubscribed") } == true)
            // With no channel left it is stopped, and says why.
            #expect(try store.beforeSending(first, nowMs: at) == nil)
            let stopped = try stored(first)
            #expect(stopped.state == .suppressed && stopped.suppressionReason == "no_consent" && stopped.events.last?.kind == .suppressed)
            // Nothing was sent to unsubscribe from (before, an unsubscribe on a delivery
            // suppressed when planned, with no channel, opted the person out of every channel).
            await #expect(throws: RPCError(.failedPrecondition, "delivery_id: delivery \(first.deliveryId) was suppressed, never sent")) {
                _ = try await routing.report(event(first.deliveryId, .unsubscribed))
            }

            // A hard bounce of the push token since it was planned: on to the webhook.
            _ = try await routing.report(event(push.deliveryId, .bounced, hard: true))
            #expect(try store.beforeSending(third, nowMs: at)?.channel == .webhook)

            // Quiet hours: a normal message due at 22:00 in Paris waits until 08:00; a critical one goes.
            let normal = try await routing.route(routeRequest("p", key: "k4", channels: [.webhook]))
            #expect(try store.beforeSending(normal, nowMs: june1 + 10 * hour) == nil)
            #expect(try stored(normal).state == .scheduled && stored(normal).nextAttemptAtMs == june1 + 20 * hour)
            #expect(try store.beforeSending(stored(third), nowMs: june1 + 10 * hour)?.channel == .webhook)

            // not_after passed, or quiet hours lasting past it: expired.
            let late = try await routing.route(routeRequest("p", key: "k5", channels: [.webhook], notAfter: june1 + 2 * hour))
            #expect(try store.beforeSending(late, nowMs: june1 + 3 * hour) == nil)
            let lateNow = try stored(late)
            #expect(lateNow.state == .suppressed && lateNow.suppressionReason == "expired", "\(lateNow)")
            let evening = try await routing.route(routeRequest("p", key: "k6", channels: [.webhook], notAfter: june1 + 10 * hour + 30 * 60_000))
            #expect(try store.beforeSending(evening, nowMs: june1 + 10 * hour) == nil)
            #expect(try stored(evening).suppressionReason == "expired")

            // The dispatcher judges the same way: the third goes by webhook; the second, moved to
            // push before the token bounced, is stopped there; the first never goes.
            clock.advance(seconds: 2)
            try await dispatching(routing) {
                try await waitFor { try store.delivery(third.deliveryId)?.state == .sent }
                try await waitFor { try store.delivery(second.deliveryId)?.state == .suppressed }
            }
            #expect(try stored(third).channel == .webhook && stored(second).suppressionReason == "unreachable")
            #expect(Set(sink.requests.compactMap { $0.headers["x-arbiter-delivery"] }) == Set([email, push, third].map(\.deliveryId)))
            #expect(sink.requests.count == 3)

            // Erased with its person after the dispatcher read it: that copy is not sent, even
            // on the path that needs no write (before, only evidence was read there).
            let erasedLater = try await routing.route(routeRequest("p", key: "k7", channels: [.webhook], critical: true))
            #expect(try store.beforeSending(erasedLater, nowMs: at) != nil)
            try await store.pool.write { try RoutingStore.erase($0, "p") }
            #expect(try store.beforeSending(erasedLater, nowMs: at) == nil)

            // ListDeliveries: newest first, by creation (before, by send time: a suppressed one,
            // with none, came after every scheduled one).
            clock.advance(seconds: 1)
            let tomorrow = try await routing.route(routeRequest("p", key: "k7", channels: [.webhook], notBefore: june1 + day))
            clock.advance(seconds: 1)
            let expired = try await routing.route(routeRequest("p", key: "k8", channels: [.webhook], notAfter: june1 + 60_000))
            #expect(tomorrow.state == .scheduled && expired.suppressionReason == "expired")
            #expect(try store.deliveries(person: "p", state: nil, before: nil, limit: 2).deliveries.map(\.deliveryId) == [expired.deliveryId, tomorrow.deliveryId])
        }
    }

    @Test("consent withdrawn in the profile service after planning is read again before the send: the delivery falls back or stops; while consent cannot be read it waits")
    func consentReadAgain() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }  // noon in Paris
        try await withRouting(clock: clock, configure: uncapped) { routing, profile, sink in
            try seedReachable(profile.store, "p", at: june1 - day)
            let store = routing.store
            func stored(_ d: RoutingV1.Delivery) throws -> RoutingV1.Delivery { try #require(try store.delivery(d.deliveryId)) }
            let both = try await routing.route(routeRequest("p", key: "c1", channels: [.email, .push], notBefore: june1 + hour))
            let emailOnly = try await routing.route(routeRequest("p", key: "c2", channels: [.email], notBefore: june1 + hour))
            let waiting = try await routing.route(routeRequest("p", key: "c3", channels: [.push], notBefore: june1 + hour))
            #expect([both, emailOnly, waiting].allSatisfy { $0.state == .scheduled && $0.sendAtMs == june1 + hour })
            // Withdrawn in the profile service, not through routing: only a second read shows it.
            try seed(profile.store, "p", consent: [("marketing", .email, false)], at: june1 + 60_000)
            clock.advance(seconds: 3600)

            // The profile service down: the delivery is not sent, and waits (the test's
            // initialBackoffMs, 5 ms); past its not_after it would expire.
            let down = RPCClient(host: "127.0.0.1", port: try await unusedPort())
            defer { down.close() }
            var configuration = routing.configuration
            configuration.profileTimeoutMs = 2000
            let blind = Dispatcher(store: store, adapters: routing.adapters, configuration: configuration, profile: down,
                                   logger: quietLogger("routing-test"), clock: clock.read)
            await blind.attempt(waiting)
            #expect(try stored(waiting).state == .scheduled && stored(waiting).nextAttemptAtMs == june1 + hour + 5)
            #expect(sink.requests.isEmpty)
            #expect(store.check(waiting, .init(), consent: .unreadable("down"), nowMs: june1 + hour)
                    == .later(atMs: june1 + hour + 5, why: "consent cannot be read again: down"))
            // Each wait is as long as it has waited since it was due (5 ms at least, 20 at most here).
            #expect(store.check(waiting, .init(), consent: .unreadable("down"), nowMs: june1 + hour + 8)
                    == .later(atMs: june1 + hour + 16, why: "consent cannot be read again: down"))
            #expect(store.check(waiting, .init(), consent: .unreadable("down"), nowMs: june1 + hour + 100)
                    == .later(atMs: june1 + hour + 120, why: "consent cannot be read again: down"))
            // Not past its not_after: it tries once more then; at not_after it expires.
            var bounded = waiting
            bounded.notAfterMs = june1 + hour + 1
            #expect(store.check(bounded, .init(), consent: .unreadable("down"), nowMs: june1 + hour)
                    == .later(atMs: june1 + hour + 1, why: "consent cannot be read again: down"))
            guard case .expired = store.check(bounded, .init(), consent: .unreadable("down"), nowMs: june1 + hour + 1) else {
                Issue.record("a delivery that cannot wait past its not_after should expire")
                return
            }

            // With the profile service: email is refused now; push is the fallback of one, the
            // other has none left and stops, saying why.
            clock.advance(seconds: 1)
            try await dispatching(routing) {
                try await waitFor { try store.delivery(both.deliveryId)?.state == .sent }
                try await waitFor { try store.delivery(emailOnly.deliveryId)?.state == .suppressed }
                try await waitFor { try store.delivery(waiting.deliveryId)?.state == .sent }
            }
            let fellBack = try stored(both)
            #expect(fellBack.channel == .push)
            #expect(fellBack.events.contains { $0.kind == .fellBack && $0.detail.contains("marketing.email denied by test") && $0.detail.contains("read again") },
                    "\(fellBack.events)")
            let stopped = try stored(emailOnly)
            #expect(stopped.suppressionReason == "no_consent" && stopped.suppressionDetail.contains("marketing.email denied"), "\(stopped)")
            #expect(Set(sink.requests.compactMap { $0.headers["x-arbiter-delivery"] }) == [both.deliveryId, waiting.deliveryId])

            // An erased person (unknown to the profile service): nothing is sent.
            let last = try await routing.route(routeRequest("p", key: "c4", channels: [.push], notBefore: june1 + 2 * hour))
            _ = try profile.store.erase(person: "p", nowMs: june1 + hour + 2000)
            clock.advance(seconds: 3600)
            try await dispatching(routing) { try await waitFor { try store.delivery(last.deliveryId)?.state == .suppressed } }
            let gone = try stored(last)
            #expect(gone.suppressionDetail.contains("no longer knows the person"), "\(gone)")
            #expect(sink.requests.count == 2)
        }
    }

    @Test("a hard bounce after a soft one marks the address; a hard bounce on the fallback channel counts too")
    func bouncesPerChannel() async throws {
        try await withRouting { routing, profile, _ in
            try seedReachable(profile.store, "p", at: now() - day)
            let d = try await routing.route(routeRequest("p", key: "b1", channels: [.push, .webhook], critical: true))
            try await send(routing, d)
            _ = try await routing.report(event(d.deliveryId, .bounced))  // soft: nothing changes
            #expect(try routing.store.evidence(person: "p").person.unreachable.isEmpty)
            // Before, this was dropped as a second BOUNCED on the delivery.
            let hard = try await routing.report(event(d.deliveryId, .bounced, hard: true))
            #expect(hard.state == .scheduled && hard.channel == .webhook)
            // The same report again (a retry, a provider resending): still push's bounce. Before,
            // it counted against the webhook the delivery had moved to, and stopped it.
            let again = try await routing.report(event(d.deliveryId, .bounced, hard: true))
            #expect(again.state == .scheduled && again.channel == .webhook && again.events.count == hard.events.count)
            #expect(try routing.store.evidence(person: "p").person.unreachable == [Evidence.unreachableKey(.push, "tok-p")])
            try await dispatching(routing) {
                try await waitFor { try routing.store.delivery(d.deliveryId)?.state == .sent }
            }
            // Push's bounce once more, after the fallback went out, naming its channel: still a
            // duplicate (unnamed, it reads as the webhook's, as below).
            let sentEvents = try #require(try routing.store.delivery(d.deliveryId)).events.count
            var repeated = event(d.deliveryId, .bounced, hard: true)
            repeated.channel = .push
            #expect(try await routing.report(repeated).events.count == sentEvents)
            #expect(try routing.store.evidence(person: "p").person.unreachable == [Evidence.unreachableKey(.push, "tok-p")])
            var never = event(d.deliveryId, .bounced, hard: true)
            never.channel = .sms
            await expectInvalid("channel: delivery \(d.deliveryId) was not sent on sms") { _ = try await routing.report(never) }
            // And a hard bounce on the fallback channel: before, dropped too.
            _ = try await routing.report(event(d.deliveryId, .bounced, hard: true))
            let unreachable = try routing.store.evidence(person: "p").person.unreachable
            #expect(unreachable == [Evidence.unreachableKey(.push, "tok-p"), Evidence.unreachableKey(.webhook, "p")])
            let bounces = try #require(try routing.store.delivery(d.deliveryId)).events.filter { $0.kind == .bounced }
            #expect(bounces.map(\.detail) == ["soft", "hard", "hard"] && bounces.map(\.channel) == [.push, .push, .webhook])
        }
    }

    @Test("a normal message that falls back at send time is held to the fallback channel's caps")
    func fallbackWithinCaps() async throws {
        try await withRouting(configure: { $0.quietHoursStart = "00:00"; $0.quietHoursEnd = "00:00" }) { routing, profile, _ in
            try seedReachable(profile.store, "p", at: now() - day)
            let a = try await routing.route(routeRequest("p", key: "fa", channels: [.push, .webhook]))
            let b = try await routing.route(routeRequest("p", key: "fb", channels: [.webhook]))
            let c = try await routing.route(routeRequest("p", key: "fc", channels: [.webhook]))
            #expect([a, b, c].map(\.channel) == [.push, .webhook, .webhook])
            try await send(routing, a, b, c)
            // A's push token bounces: it falls back to the webhook, which has had its 2 a day.
            let moved = try await routing.report(event(a.deliveryId, .bounced, hard: true))
            #expect(moved.state == .scheduled && moved.channel == .webhook)
            // Before, it went: 3 on the webhook within a day against a cap of 2.
            #expect(try routing.store.beforeSending(moved, nowMs: now()) == nil)
            let stopped = try #require(try routing.store.delivery(a.deliveryId))
            #expect(stopped.state == .suppressed && stopped.suppressionReason == "capped", "\(stopped.state) \(stopped.suppressionReason)")
        }
    }

    @Test("a normal message a merge moved to another person, or planned for a person another merged into, is held to the caps of the person it goes to, also on time")
    func mergedWithinCaps() async throws {
        try await withRouting(configure: { $0.quietHoursStart = "00:00"; $0.quietHoursEnd = "00:00" }) { routing, profile, _ in
            // `busy` has had the webhook's 2 a day; `planned` has one planned, within its own
            // caps; then one merges into the other: `planned` into `busy` (the delivery moves),
            // or `busy` into `planned` (the survivor's own delivery stays).
            for (seq, busy, planned, survivor) in [(Int64(1), "b", "a", "b"), (2, "d", "c", "c")] {
                try seedReachable(profile.store, busy, at: now() - day)
                try seedReachable(profile.store, planned, at: now() - day)
                let sent1 = try await routing.route(routeRequest(busy, key: "m\(busy)1", channels: [.webhook]))
                let sent2 = try await routing.route(routeRequest(busy, key: "m\(busy)2", channels: [.webhook]))
                try await send(routing, sent1, sent2)
                let waiting = try await routing.route(routeRequest(planned, key: "m\(planned)1", channels: [.webhook]))
                #expect(waiting.state == .scheduled)
                let source = survivor == busy ? planned : busy
                try routing.store.apply([(seq, .merge(target: survivor, sources: [source]))], nowMs: now())
                let merged = try #require(try routing.store.delivery(waiting.deliveryId))
                #expect(merged.personId == survivor)
                // Before, on time it was not checked again, and went: 3 on the webhook within a day.
                #expect(try routing.store.beforeSending(merged, nowMs: max(now(), merged.sendAtMs)) == nil)
                let stopped = try #require(try routing.store.delivery(waiting.deliveryId))
                #expect(stopped.state == .suppressed && stopped.suppressionReason == "capped", "\(survivor): \(stopped.state) \(stopped.suppressionReason)")
            }
        }
    }

    @Test("merges move deliveries to the survivor; an erasure leaves nothing of the person in the file")
    func identityChanges() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            try seedReachable(profile.store, "a", at: june1 - day)
            try seedReachable(profile.store, "b", at: june1 - day)
            let d = try await routing.route(routeRequest("a", key: "m1", channels: [.email], critical: true))
            try await send(routing, d)
            _ = try await routing.report(event(d.deliveryId, .bounced, hard: true))
            // Both opted out of marketing by SMS: the newer record stays with the survivor, unsynced
            // (before, a's was dropped and b kept its older one).
            try await routing.store.pool.write { db in
                try db.execute(sql: """
                    INSERT INTO opt_out (person_id, purpose, channel, at_ms, source, synced, recorded_at_ms)
                    VALUES ('b', 'marketing', 2, ?1, 'routing:unsubscribe', 1, ?1), ('a', 'marketing', 2, ?2, 'routing:complaint', 0, ?2)
                    """, arguments: [june1 - day, june1 - hour])
            }
            try routing.store.apply([(1, .merge(target: "b", sources: ["a"]))], nowMs: june1)
            #expect(try routing.store.unsyncedOptOuts(limit: 10) == [RoutingStore.OptOut(person: "b", purpose: "marketing", channel: .sms, atMs: june1 - hour, source: "routing:complaint")])
            #expect(try routing.store.deliveries(person: "b", state: nil, before: nil, limit: 10).deliveries.map(\.deliveryId) == [d.deliveryId])
            #expect(try routing.store.deliveries(person: "a", state: nil, before: nil, limit: 10).deliveries.isEmpty)
            #expect(try routing.store.evidence(person: "b").person.unreachable.contains(Evidence.unreachableKey(.email, "a@example.com")))
            // A Route for a, which the profile service still answers as a (it has not applied
            // the merge yet), is planned and stored for b, with b's evidence: a's bounced address
            // is known there (before, it was planned from a's, emptied by the merge, and sent).
            let late = try await routing.route(routeRequest("a", key: "m3", channels: [.email], critical: true))
            #expect(late.personId == "b" && late.state == .suppressed, "\(late.personId) \(late.state) \(late.suppressionReason)")
            #expect(try await routing.store.pool.read { try String.fetchOne($0, sql: "SELECT origin_person_id FROM delivery WHERE delivery_id = ?", arguments: [late.deliveryId]) } == "a")
            try routing.store.apply([(1, .erase(person: "b", absorbed: []))], nowMs: june1)  // seq 1 again: ignored
            #expect(try routing.store.delivery(d.deliveryId) != nil)
            try routing.store.apply([(2, .erase(person: "b", absorbed: ["a"]))], nowMs: june1)
            #expect(try routing.store.delivery(d.deliveryId) == nil)
            // A Route that reached the store after the erasure (here the profile service has
            // not erased b yet) stores nothing: before, its delivery was sent and kept.
            await #expect(throws: RPCError(.notFound, "person: person b was erased")) {
                _ = try await routing.route(routeRequest("b", key: "m2", channels: [.email], critical: true))
            }
            #expect(try routing.store.deliveries(person: "b", state: nil, before: nil, limit: 10).deliveries.isEmpty)
            let directory = routing.store.pool.path.components(separatedBy: "/").dropLast().joined(separator: "/")
            #expect(!filesContain("a@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
            #expect(try routing.store.identityCursor() == 2)
        }
    }

    @Test("an unmerge gives the split person back its deliveries (and those it had absorbed), with the bounces and opt-outs their events record; erasing it later leaves none of its deliveries")
    func unmergeThenErase() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            var routed: [String: String] = [:]
            for (i, person) in ["a", "b", "c"].enumerated() {
                try seedReachable(profile.store, person, at: june1 - day)
                routed[person] = try await routing.route(routeRequest(person, key: "u\(i)", channels: [.email], critical: true)).deliveryId
            }
            // b also has one planned for later.
            let later = try await routing.route(routeRequest("b", key: "u-later", channels: [.email], notBefore: june1 + 2 * day))
            #expect(later.state == .scheduled)
            try await send(routing, try #require(try routing.store.delivery(routed["b"]!)))
            // a's address bounced before any merge.
            try await send(routing, try #require(try routing.store.delivery(routed["a"]!)))
            _ = try await routing.report(event(routed["a"]!, .bounced, hard: true))
            func held(_ person: String) throws -> Set<String> {
                Set(try routing.store.deliveries(person: person, state: nil, before: nil, limit: 10).deliveries.map(\.deliveryId))
            }
            // b into a, then a into c: c holds them all.
            try routing.store.apply([(1, .merge(target: "a", sources: ["b"])), (2, .merge(target: "c", sources: ["a"]))], nowMs: june1)
            #expect(try held("c") == Set(routed.values).union([later.deliveryId]) && held("a").isEmpty && held("b").isEmpty)
            // While merged, b's sent message hard-bounces and b unsubscribes from it: recorded for c.
            _ = try await routing.report(event(routed["b"]!, .bounced, hard: true))
            _ = try await routing.report(event(routed["b"]!, .unsubscribed))
            #expect(try routing.store.evidence(person: "c").person.optOuts.count == 1)
            #expect(try routing.store.evidence(person: "c").person.unreachable ==
                    [Evidence.unreachableKey(.email, "a@example.com"), Evidence.unreachableKey(.email, "b@example.com")])
            // b split off a (an inner merge) while a is in c: b's deliveries go back to b with
            // the evidence their events hold, so the one planned for later is not sent to the
            // address that bounced (before, the deliveries stayed with c).
            clock.advance(seconds: 60)
            try routing.store.apply([(3, .unmerge(survivor: "c", split: "b"))], nowMs: clock.read())
            #expect(try held("b") == [routed["b"]!, later.deliveryId] && held("c") == [routed["a"]!, routed["c"]!])
            let evidence = try routing.store.evidence(person: "b").person
            #expect(evidence.unreachable == [Evidence.unreachableKey(.email, "b@example.com")])
            #expect(evidence.optOuts.map(\.purpose) == ["marketing"] && evidence.optOuts[0].recordedAtMs == clock.read())
            // b's bounced address went back with it (before, c kept it, also after b's erasure).
            #expect(try routing.store.evidence(person: "c").person.unreachable == [Evidence.unreachableKey(.email, "a@example.com")])
            let moved = try #require(try routing.store.delivery(later.deliveryId))
            guard case .refused = routing.store.check(moved, evidence, nowMs: moved.sendAtMs) else {
                Issue.record("the delivery moved back would go against b's unsubscribe")
                return
            }
            // The unsubscribe goes to the profile service for b too; c's own evidence is not b's.
            #expect(try routing.store.unsyncedOptOuts(limit: 10).map(\.person).contains("b"))
            #expect(try routing.store.evidence(person: "a").person.optOuts.isEmpty)
            // a split off c: its delivery goes back to a; b's stay with b (a no longer holds them).
            try routing.store.apply([(4, .unmerge(survivor: "c", split: "a"))], nowMs: clock.read())
            #expect(try held("a") == [routed["a"]!] && held("b") == [routed["b"]!, later.deliveryId] && held("c") == [routed["c"]!])
            #expect(try routing.store.evidence(person: "a").person.unreachable == [Evidence.unreachableKey(.email, "a@example.com")])
            #expect(try routing.store.evidence(person: "c").person.unreachable.isEmpty)
            // a erased: nothing of its delivery stays (before, it stayed with c).
            try routing.store.apply([(5, .erase(person: "a", absorbed: []))], nowMs: clock.read())
            #expect(try routing.store.delivery(routed["a"]!) == nil)
            #expect(try held("c") == [routed["c"]!])
            let directory = routing.store.pool.path.components(separatedBy: "/").dropLast().joined(separator: "/")
            #expect(!filesContain("a@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
            #expect(filesContain("c@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
            // b erased: nor its bounced address.
            try routing.store.apply([(6, .erase(person: "b", absorbed: []))], nowMs: clock.read())
            #expect(!filesContain("b@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
        }
    }

    @Test("a bounced address two merged persons share stays with each: an unmerge gives the split person its own and leaves the survivor's; an erasure found under the survivor takes only the erased person's")
    func sharedBouncedAddress() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, _, _ in
            try await routing.store.pool.write { db in
                for person in ["a", "b"] {
                    try db.execute(sql: "INSERT INTO unreachable (person_id, channel, address, at_ms) VALUES (?, ?, 'home@example.com', ?)",
                                   arguments: [person, CommonV1.Channel.email.rawValue, june1 - day])
                }
            }
            try routing.store.apply([(1, .merge(target: "a", sources: ["b"]))], nowMs: june1)
            #expect(try routing.store.evidence(person: "a").person.unreachable == [Evidence.unreachableKey(.email, "home@example.com")])
            try routing.store.apply([(2, .unmerge(survivor: "a", split: "b"))], nowMs: june1)
            for person in ["a", "b"] {
                #expect(try routing.store.evidence(person: person).person.unreachable == [Evidence.unreachableKey(.email, "home@example.com")])
            }
            try routing.store.apply([(3, .merge(target: "a", sources: ["b"])), (4, .erase(person: "b", absorbed: []))], nowMs: june1)
            #expect(try routing.store.evidence(person: "a").person.unreachable == [Evidence.unreachableKey(.email, "home@example.com")])
            // The row left is a's own (not b's, which the erasure took).
            #expect(try await routing.store.pool.read { db in try String.fetchAll(db, sql: "SELECT person_id || '/' || origin_person_id FROM unreachable") } == ["a/"])
        }
    }

    @Test("a store from before bounced addresses kept whose they were opens with each its holder's own, which a merge then keeps")
    func unreachableMigration() async throws {
        let directory = try storeMigrated(upTo: "v6: persons merged, by target", by: RoutingStore.migrator, file: "routing.sqlite",
                                          prefix: "routing-test") { db in
            try db.execute(sql: "INSERT INTO unreachable (person_id, channel, address, at_ms) VALUES ('a', ?, 'a@example.com', 1)",
                           arguments: [CommonV1.Channel.email.rawValue])
        }
        let store = try RoutingStore(directory: directory, configuration: RoutingConfiguration())
        #expect(try store.evidence(person: "a").person.unreachable == [Evidence.unreachableKey(.email, "a@example.com")])
        try store.apply([(1, .merge(target: "b", sources: ["a"])), (2, .unmerge(survivor: "b", split: "a"))], nowMs: june1)
        #expect(try store.evidence(person: "a").person.unreachable == [Evidence.unreachableKey(.email, "a@example.com")])
        #expect(try store.evidence(person: "b").person.unreachable.isEmpty)
    }

    @Test("an erasure finds the person's deliveries that a merge moved to a survivor the identity service no longer names")
    func eraseFindsMovedDeliveries() async throws {
        let clock = TestClock()
        clock.now.withLock { $0 = june1 }
        try await withRouting(clock: clock) { routing, profile, _ in
            for person in ["a", "c"] { try seedReachable(profile.store, person, at: june1 - day) }
            let a = try await routing.route(routeRequest("a", key: "e1", channels: [.email], critical: true))
            let c = try await routing.route(routeRequest("c", key: "e2", channels: [.email], critical: true))
            try routing.store.apply([(1, .merge(target: "c", sources: ["a"]))], nowMs: june1)
            // The erasure names a alone (as after an unmerge this store missed): its delivery is
            // found under c all the same.
            try routing.store.apply([(2, .erase(person: "a", absorbed: []))], nowMs: june1)
            #expect(try routing.store.delivery(a.deliveryId) == nil)
            #expect(try routing.store.delivery(c.deliveryId) != nil)
            let directory = routing.store.pool.path.components(separatedBy: "/").dropLast().joined(separator: "/")
            #expect(!filesContain("a@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
        }
    }

    @Test("an erasure whose WAL truncation failed is truncated later by the retrier, since the feed does not replay it")
    func erasureTruncationRetriedTimed() async throws {
        try await withRouting(configure: uncapped) { routing, profile, _ in
            try seedReachable(profile.store, "z", at: now() - day)
            let d = try await routing.route(routeRequest("z", key: "t1", channels: [.email], critical: true))
            let directory = routing.store.pool.path.components(separatedBy: "/").dropLast().joined(separator: "/")
            try routing.store.truncation.pay(routing.store.pool)  // the truncation a new store owes
            // A reader on an older snapshot: the truncation after the erasure cannot finish (5 s).
            let release = try await holdReadSnapshot(routing.store.pool.path)
            try routing.store.apply([(1, .erase(person: "z", absorbed: []))], nowMs: now())
            #expect(try routing.store.delivery(d.deliveryId) == nil && routing.store.identityCursor() == 1)
            // The WAL still busy: the feed goes on all the same (before, every poll failed here).
            try routing.store.apply([(2, .merge(target: "y", sources: ["x"]))], nowMs: now())
            #expect(try routing.store.identityCursor() == 2)
            release()
            #expect(filesContain("z@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]))
            // The feed brings nothing new: the service's retrier pays it (before, the next poll did).
            let retrier = Task { try await routing.store.truncationRetrier(interval: .milliseconds(20), logger: Logger(label: "test")).run() }
            defer { retrier.cancel() }
            #expect(try await eventually { !filesContain("z@example.com", in: directory, files: ["routing.sqlite", "routing.sqlite-wal"]) })
        }
    }
}

extension RoutingV1.RetryDeadLetterRequest {
    static func with(_ id: String) -> Self {
        var request = Self()
        request.deliveryId = id
        return request
    }
}

/// Runs Debian's aiosmtpd (scripts/smtp-sink.py) on a free port for `body`, which gets the
/// port and the directory the server writes each accepted message to.
func withSMTPServer<T: Sendable>(failFirst: Int = 0, _ body: @Sendable (Int, String) async throws -> T) async throws -> T {
    let port = try await unusedPort()
    let directory = temporaryDirectory("smtp-sink")
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
    let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("scripts/smtp-sink.py").path
    process.arguments = [script, "--port", "\(port)", "--dir", directory, "--fail-first", "\(failFirst)"]
    let output = Pipe()
    process.standardOutput = output
    try process.run()
    defer { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
    // Wait until it listens.
    let ready = try await eventually(15) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }
    guard ready else { throw RPCError(.unavailable, "the SMTP test server did not start (is python3-aiosmtpd installed?)") }
    return try await body(port, directory)
}
