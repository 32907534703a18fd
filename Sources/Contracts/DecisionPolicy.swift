/// The fixed policies a decision log can be replayed against (EvaluatePolicy's targets),
/// one of which (`rulesOnly`) is the global holdout's default experience. Shared by the
/// decision service and the simulations that run them as baselines.
public enum DecisionPolicy: Equatable, Sendable {
    /// The highest score (learned propensity × value × lever), no exploration.
    case noExploration
    /// The highest lever, then the catalog order (action id): business priority, no learning.
    case rulesOnly
    /// The highest value × lever.
    case highestValue
    /// That action whenever it is eligible, else nothing.
    case always(String)
    /// The policy that made the decisions (its logged propensities).
    case logging

    /// Parses `no_exploration`, `rules_only`, `highest_value`, `always:<action id>` or
    /// `logging`; nil for anything else (an empty action id included).
    public init?(_ text: String) {
        switch text {
        case "no_exploration": self = .noExploration
        case "rules_only": self = .rulesOnly
        case "highest_value": self = .highestValue
        case "logging": self = .logging
        case let t where t.hasPrefix("always:") && t.count > "always:".count: self = .always(String(t.dropFirst("always:".count)))
        default: return nil
        }
    }

    /// The eligible candidates' indexes in this policy's order of preference (`logging`: none).
    public func ranking(_ candidates: [DecisionV1.CandidateExplanation]) -> [Int] {
        let slots = candidates.indices.filter { candidates[$0].eligible }
        func by(_ key: (DecisionV1.CandidateExplanation) -> Double) -> [Int] {
            slots.sorted { a, b in
                let (ka, kb) = (key(candidates[a]), key(candidates[b]))
                return ka != kb ? ka > kb : candidates[a].actionId < candidates[b].actionId
            }
        }
        switch self {
        case .noExploration: return by(\.score)
        case .rulesOnly: return by(\.lever)
        case .highestValue: return by { $0.value * $0.lever }
        case .always(let id): return slots.filter { candidates[$0].actionId == id }
        case .logging: return []
        }
    }
}
