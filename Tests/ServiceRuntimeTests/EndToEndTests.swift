import Contracts
import Foundation
import RPC
import Rules
import Testing
import TestSupport

/// The four executables as processes, wired as in production, driven over TCP.
@Suite("end to end: the four services as processes")
struct EndToEndTests {
    @Test("identify, track, consent, decide with delivery through routing to a webhook, outcome, lift; an erasure reaches every service")
    func scenario() async throws {
        let dataDir = temporaryDirectory("e2e")
        let sink = try await WebhookSink.start()
        let config = dataDir + "/config.json"
        try Data("""
            {"routing": {"webhook": {"url": "http://127.0.0.1:\(sink.port)/arbiter"}, "quietHoursStart": "00:00", "quietHoursEnd": "00:00"},
             "decision": {"decideBudgetMs": 5000, "peerTimeoutMs": 3000}}
            """.utf8).write(to: URL(fileURLWithPath: config))
        let suite = try await WiredSuite.start(dataDir: dataDir, arguments: ["--config", config])
        defer { suite.kill() }
        let clients = suite.clients
        let identity = clients["identity"]!, profile = clients["profile"]!, routing = clients["routing"]!, decision = clients["decision"]!

        // Identify: an email and a device are one person.
        var link = IdentityV1.LinkRequest()
        link.identifiers = [identifier("email", "Ada@Example.com"), identifier("device_id", "dev-1")]
        link.source = "signup"
        let person = try await identity.call(IdentityV1.Identity.link, link).personId
        let byEmail = personRef(identifier("email", "ada@example.com"))

        // Profile, through identifiers: traits, consent, events.
        var traits = ProfileV1.SetTraitsRequest()
        traits.person = byEmail
        traits.traits = [CommonV1.Field("email", .string("ada@example.com")), CommonV1.Field("email_verified", .bool(true))]
        traits.source = "signup"
        #expect(try await profile.call(ProfileV1.Profile.setTraits, traits).personId == person)
        var consent = ProfileV1.SetConsentRequest()
        consent.person = byEmail
        var record = ProfileV1.ConsentRecord()
        record.purpose = "marketing"
        record.channel = .email
        record.granted = true
        record.source = "signup"
        consent.consents = [record]
        _ = try await profile.call(ProfileV1.Profile.setConsent, consent)
        var track = ProfileV1.TrackRequest()
        track.events = (0..<3).map { i in
            var event = ProfileV1.Event()
            event.eventId = "view-\(i)"
            event.type = "view"
            event.person = personRef(identifier("device_id", "dev-1"))
            return event
        }
        #expect(try await profile.call(ProfileV1.Profile.track, track).accepted == 3)

        // Decide, by email, with delivery.
        var upsert = DecisionV1.UpsertActionRequest()
        var action = DecisionV1.Action()
        action.id = "welcome"
        action.value = 10
        action.channels = [.email]
        action.consentPurpose = "marketing"
        upsert.action = action
        _ = try await decision.call(DecisionV1.Decision.upsertAction, upsert)
        var decide = DecisionV1.DecideRequest()
        decide.person = byEmail
        decide.placement = "home"
        decide.deliver = true
        let decided = try await decision.call(DecisionV1.Decision.decide, decide)
        #expect(decided.personId == person && !decided.degraded, "\(decided.degradedReasons)")
        let chosen = try #require(decided.actions.first)
        #expect(chosen.actionId == "welcome" && chosen.deliveryError.isEmpty, "\(chosen.deliveryError)")
        #expect(chosen.delivery?.state == .scheduled && chosen.delivery?.channel == .email && chosen.delivery?.address == "ada@example.com")

        // Routing sends it to the webhook (email goes there without an SMTP relay).
        #expect(try await eventually(20) { sink.requests.count == 1 })
        let sent = try #require(sink.requests.first)
        #expect(sent.headers["idempotency-key"] == "\(decided.decisionId):welcome:email" && sent.bodyText.contains("\"person_id\":\"\(person)\""))
        var opened = RoutingV1.ReportDeliveryEventRequest()
        opened.deliveryId = chosen.deliveryId
        opened.kind = .opened
        _ = try await routing.call(RoutingV1.Routing.reportDeliveryEvent, opened)
        var outcome = DecisionV1.ReportOutcomeRequest()
        outcome.outcomeId = "click-1"
        outcome.decisionId = decided.decisionId
        outcome.actionId = "welcome"
        outcome.outcome = .click
        _ = try await decision.call(DecisionV1.Decision.reportOutcome, outcome)
        outcome.outcomeId = "conversion-1"
        outcome.outcome = .conversion
        outcome.value = 42
        _ = try await decision.call(DecisionV1.Decision.reportOutcome, outcome)

        // Lift: Ada counts once, converted, on the side of the holdout her decision was logged with.
        let lift = try await decision.call(DecisionV1.Decision.liftReport, DecisionV1.LiftReportRequest())
        let side = try #require(decided.holdout ? lift.control : lift.treated)
        #expect(side.persons == 1 && side.convertedPersons == 1 && side.value == 42, "\(lift)")
        #expect((decided.holdout ? lift.treated : lift.control)?.persons ?? 0 == 0 && !lift.notes.isEmpty)

        // Erasure in the identity service reaches profile, decision and routing through the feed.
        var erase = IdentityV1.EraseRequest()
        erase.target = .personId(person)
        _ = try await identity.call(IdentityV1.Identity.erase, erase)
        var list = RoutingV1.ListDeliveriesRequest()
        list.personId = person
        var getDecision = DecisionV1.GetDecisionRequest()
        getDecision.decisionId = decided.decisionId
        var getProfile = ProfileV1.GetProfileRequest()
        getProfile.person = personRef(person)
        let (listRequest, decisionRequest, profileRequest) = (list, getDecision, getProfile)
        #expect(try await eventually(20) {
            let deliveries = try await routing.call(RoutingV1.Routing.listDeliveries, listRequest).deliveries
            func gone(_ call: () async throws -> Void) async -> Bool {
                do { try await call(); return false } catch { return (error as? RPCError)?.code == .notFound }
            }
            let decisionGone = await gone { _ = try await decision.call(DecisionV1.Decision.getDecision, decisionRequest) }
            let profileGone = await gone { _ = try await profile.call(ProfileV1.Profile.getProfile, profileRequest) }
            return deliveries.isEmpty && decisionGone && profileGone
        })

        for (name, status) in await suite.stop() { #expect(status == 0, "\(name)") }
        await sink.close()
    }
}
