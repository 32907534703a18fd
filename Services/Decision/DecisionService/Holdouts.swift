import Foundation

/// The control groups that let Arbiter measure itself (the `holdout` part of the decision
/// settings). Defaults per field.
public struct HoldoutConfiguration: Sendable, Codable, Equatable {
    /// Share of persons in the global holdout: they get the default experience (the
    /// `rules_only` policy) instead of the learned one. Default 0.05.
    public var share = 0.05
    /// Mixed into every assignment. Changing it reassigns everyone (and breaks running
    /// comparisons: LiftReport then warns of a sample-ratio mismatch). Default "arbiter".
    public var salt = "arbiter"
    /// Share of the persons an override affects who keep the algorithm's choice, so that
    /// LiftReport can measure what the override costs or gains. Default 0.1.
    public var overrideControlShare = 0.1

    public init() {}

    /// Missing keys keep their defaults; a value out of range stops the service at start.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = Self()
        func readShare(_ key: CodingKeys, _ fallback: Double) throws -> Double {
            let value = try c.decodeIfPresent(Double.self, forKey: key) ?? fallback
            guard value >= 0, value <= 0.5 else {
                throw DecodingError.dataCorruptedError(forKey: key, in: c, debugDescription: "\(key.stringValue) must be between 0 and 0.5, got \(value)")
            }
            return value
        }
        share = try readShare(.share, d.share)
        overrideControlShare = try readShare(.overrideControlShare, d.overrideControlShare)
        salt = try c.decodeIfPresent(String.self, forKey: .salt) ?? d.salt
        guard !salt.isEmpty, salt.utf8.count <= 256 else {
            throw DecodingError.dataCorruptedError(forKey: .salt, in: c, debugDescription: "salt must be 1-256 bytes")
        }
    }

    /// The person's position in [0, 1) for one assignment (`scope`: "global",
    /// "action:<id>", "override:<id>"). Deterministic: the same salt, person and scope give
    /// the same position on every machine and after every restart, and independent scopes
    /// give independent positions.
    public func position(of person: String, scope: String) -> Double {
        Self.unitHash("\(salt)\u{1F}\(scope)\u{1F}\(person)")
    }

    /// Whether `person` is in the global control group.
    public func isControl(_ person: String) -> Bool { position(of: person, scope: "global") < share }

    /// A stable hash of `text` onto [0, 1): FNV-1a over its UTF-8 bytes, then the SplitMix64
    /// finalizer so that neighbouring inputs land far apart.
    static func unitHash(_ text: String) -> Double {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325
        for byte in text.utf8 {
            h ^= UInt64(byte)
            h = h &* 0x100_0000_01B3
        }
        h = (h ^ (h >> 30)) &* 0xBF58_476D_1CE4_E5B9
        h = (h ^ (h >> 27)) &* 0x94D0_49BB_1331_11EB
        h ^= h >> 31
        return Double(h >> 11) / Double(1 << 53)
    }
}
