public import Contracts
import Foundation
import Rules

/// A synthetic market with a hidden truth: persons in three life stages, a catalog of
/// offers, and each offer's true conversion rate per life stage. The services never see
/// the truth; simulations drive them with outcomes drawn from it and then compare what
/// Arbiter found and measured against it. Everything follows from the seed.
public struct World: Sendable {
    public struct Person: Sendable {
        public var id: String
        public var age: Int
        /// "young" (< 30), "family" (30-59) or "senior" (60+): a profile segment, defined by age.
        public var stage: String
        public var tier: String
        public var device: String
        public var email: String
        public var phone: String
        /// Consent to marketing by email and by push.
        public var marketingEmail: Bool
        public var marketingPush: Bool
    }

    public struct Offer: Sendable {
        public var action: DecisionV1.Action
        /// The hidden conversion rate per life stage.
        public var truth: [String: Double]
    }

    public static let stages = ["young", "family", "senior"]
    public let persons: [Person]
    public let offers: [Offer]

    public init(persons count: Int, seed: UInt64) {
        var random = SplitMix64(seed: seed)
        let tiers = ["gold", "silver", "silver", "bronze", "bronze"]
        persons = (0..<count).map { n in
            let age = 18 + random.int(68)
            let stage = age < 30 ? "young" : age < 60 ? "family" : "senior"
            return Person(id: "sim-\(n)", age: age, stage: stage, tier: tiers[random.int(tiers.count)],
                          device: random.unit() < 0.4 ? "ios" : "web", email: "person\(n)@example.com",
                          phone: String(format: "+3361%07d", n), marketingEmail: random.unit() < 0.8, marketingPush: random.unit() < 0.5)
        }
        func offer(_ id: String, _ name: String, value: Double, lever: Double = 1, channels: [CommonV1.Channel] = [],
                   purpose: String = "", eligibility: String = "", truth: [Double]) -> Offer {
            var action = DecisionV1.Action()
            action.id = id
            action.name = name
            action.value = value
            action.lever = lever
            action.channels = channels
            action.consentPurpose = purpose
            action.eligibility = eligibility
            return Offer(action: action, truth: Dictionary(uniqueKeysWithValues: zip(Self.stages, truth)))
        }
        // The business's own priorities (levers) favour the card upgrade and the loyalty bonus;
        // the newsletter converts most often but is worth little; each life stage has its own best offer.
        offers = [
            offer("card-upgrade", "Upgrade your card", value: 40, lever: 1.5, eligibility: "trait.tier in [\"silver\", \"gold\"]", truth: [0.02, 0.04, 0.03]),
            offer("loyalty-bonus", "Loyalty bonus", value: 15, lever: 1.3, truth: [0.05, 0.05, 0.08]),
            offer("travel-insurance", "Travel insurance", value: 30, lever: 1.2, channels: [.email, .push], purpose: "marketing", truth: [0.03, 0.06, 0.09]),
            offer("premium-trial", "Premium trial", value: 25, lever: 1.1, eligibility: "context.device == \"ios\" or trait.tier == \"gold\"", truth: [0.06, 0.05, 0.04]),
            offer("gaming-bundle", "Gaming bundle", value: 20, truth: [0.16, 0.04, 0.01]),
            offer("family-plan", "Family plan", value: 35, channels: [.email], purpose: "marketing", truth: [0.02, 0.12, 0.03]),
            offer("pension-advice", "Pension advice", value: 50, truth: [0.005, 0.03, 0.10]),
            offer("newsletter", "Newsletter", value: 5, channels: [.email], purpose: "marketing", truth: [0.20, 0.15, 0.10]),
        ]
    }

    /// The true conversion rate of `action` for `person`.
    public func truth(_ action: String, for person: Person) -> Double {
        offers.first { $0.action.id == action }?.truth[person.stage] ?? 0
    }

    public func value(_ action: String) -> Double { offers.first { $0.action.id == action }?.action.value ?? 0 }

    /// The offer with the highest expected value (rate × value) for a life stage, among `eligible`.
    public func best(for person: Person, among eligible: [String]) -> String? {
        eligible.max { truth($0, for: person) * value($0) < truth($1, for: person) * value($1) }
    }

    /// The profile facts of a person: traits, and consent records.
    public func traits(_ person: Person) -> [CommonV1.Field] {
        [CommonV1.Field("age", .number(Double(person.age))), CommonV1.Field("tier", .string(person.tier)),
         CommonV1.Field("email", .string(person.email)), CommonV1.Field("email_verified", .bool(true)),
         CommonV1.Field("push_token", .string("token-\(person.id)")), CommonV1.Field("timezone", .string("Europe/Paris"))]
    }

    /// Marketing consent by email and push as drawn; service messages (purpose "service",
    /// what routing uses for offers that need no marketing consent) on every channel.
    public func consent(_ person: Person, atMs: Int64) -> [ProfileV1.ConsentRecord] {
        [("marketing", CommonV1.Channel.email, person.marketingEmail), ("marketing", .push, person.marketingPush),
         ("service", .unspecified, true)].map { purpose, channel, granted in
            var record = ProfileV1.ConsentRecord()
            record.purpose = purpose
            record.channel = channel
            record.granted = granted
            record.source = "simulation"
            record.atMs = atMs
            return record
        }
    }

    /// The life-stage segments, as profile segment rules.
    public static let segmentRules = ["young": "trait.age < 30", "family": "trait.age >= 30 and trait.age < 60", "senior": "trait.age >= 60"]
}
