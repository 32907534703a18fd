import ArgumentParser
import Contracts
import Foundation

/// The protobuf-c bridge alone, on the two messages the services encode most: a person's
/// feature states (the profile service writes one per dirty person at each flush, about one
/// per tracked event under `arbiter-bench profile`) and a decision record with fifty
/// candidates explained (one per Decide, into the decision log). CPU per message is the
/// figure to compare builds by.
struct CodecBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "codec",
        abstract: "Encode and decode a person's feature states and a decision record (50 candidates) through protobuf-c: µs per message.")

    @Option(help: "Seconds per measurement.") var duration = 2.0

    func validate() throws {
        guard duration > 0 else { throw ValidationError("--duration must be > 0") }
    }

    func run() async throws {
        let state = Self.personState()
        let record = Self.decisionRecord()
        let stateBytes = state.serializedBytes()
        let recordBytes = record.serializedBytes()
        measure("PersonState encode (\(stateBytes.count) bytes)") { state.serializedBytes().count }
        measure("PersonState decode") { try! ProfileStoreV1.PersonState(serializedBytes: stateBytes).features.count }
        measure("DecisionRecord encode (\(recordBytes.count) bytes)") { record.serializedBytes().count }
        measure("DecisionRecord decode") { try! DecisionV1.DecisionRecord(serializedBytes: recordBytes).candidates.count }
    }

    /// Runs `body` for `duration` seconds and prints the mean time per call.
    private func measure(_ label: String, _ body: () -> Int) {
        var sink = 0
        for _ in 0..<1_000 { sink &+= body() }  // warm-up
        let clock = ContinuousClock()
        let start = clock.now
        let until = start + .milliseconds(Int(duration * 1000))
        var calls = 0
        while clock.now < until {
            for _ in 0..<100 { sink &+= body() }
            calls += 100
        }
        let seconds = (clock.now - start).inSeconds
        print(String(format: "%@: %.2f us per message, %d calls (%d)", label, seconds / Double(calls) * 1e6, calls, sink & 1))
    }

    /// Ten features of the shapes `arbiter-bench profile` defines (windowed counts and sums
    /// with a few buckets each, a distinct count of pages, a last value, decayed sums).
    static func personState() -> ProfileStoreV1.PersonState {
        var state = ProfileStoreV1.PersonState()
        let now: Int64 = 1_764_000_000_000
        for f in 0..<10 {
            var feature = ProfileStoreV1.FeatureState()
            feature.name = ["views_1h", "views_1d", "views_7d", "pages_7d", "view_recency", "purchases_30d", "spend_30d",
                            "last_order", "spend_all", "purchase_recency"][f]
            feature.version = 1
            switch f {
            case 0, 1, 2, 5, 6, 8:
                feature.buckets = (0..<5).map { b in
                    var bucket = ProfileStoreV1.Bucket()
                    bucket.startMs = now - Int64(b) * 3_600_000
                    bucket.count = UInt64(b + 1)
                    bucket.sum = Double(b) * 12.5
                    return bucket
                }
            case 3:
                feature.distinct = (0..<5).map { v in
                    var value = ProfileStoreV1.DistinctValue()
                    value.hash = UInt64(v + 1) &* 0x9e37_79b9_7f4a_7c15  // a value's hash, as states hold it
                    value.lastMs = now - Int64(v) * 60_000
                    return value
                }
            case 7:
                feature.hasLast = true
                feature.lastValue = 42
                feature.lastAtMs = now
                feature.lastEventId = "3f2a9c1e-17-42"
            default:
                feature.decayed = 3.25
                feature.decayRefMs = now
            }
            state.features.append(feature)
        }
        state.firstSeenMs = now - 86_400_000
        state.lastSeenMs = now
        state.events = 6
        return state
    }

    /// A Decide's record as the load generator's requests make it: fifty candidates, most
    /// eligible and scored, some excluded by a rule, three actions chosen.
    static func decisionRecord() -> DecisionV1.DecisionRecord {
        var record = DecisionV1.DecisionRecord()
        record.decisionId = "0193a1b2c3d4e5f60718293a4b5c6d7e"
        record.personId = "p12345"
        record.placement = "home"
        record.context = ["device": "mobile", "page": "checkout"]
        record.decidedAtMs = 1_764_000_000_000
        record.modelVersion = "thompson-v1/catalog-50"
        record.catalogVersion = 50
        record.segments = ["gold", "recent_buyer"]
        record.candidates = (0..<50).map { a in
            var candidate = DecisionV1.CandidateExplanation()
            candidate.actionId = "action-\(a)"
            candidate.arm = "placement:home"
            if a % 7 == 3 {
                candidate.excludedBy = "eligibility: trait.tier == \"gold\" is false"
            } else {
                candidate.eligible = true
                candidate.propensityEstimate = 0.05 + Double(a) / 1000
                candidate.value = Double(10 + a)
                candidate.lever = 1
                candidate.score = candidate.propensityEstimate * candidate.value
                candidate.choiceProbability = 0.02
                candidate.successes = Double(a)
                candidate.failures = Double(100 + a)
            }
            return candidate
        }
        record.actions = (0..<3).map { a in
            var action = DecisionV1.RankedAction()
            action.actionId = "action-\(a)"
            action.score = 1.5
            action.propensity = 0.4
            return action
        }
        return record
    }
}
