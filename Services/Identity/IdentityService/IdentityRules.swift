import Foundation

/// What the identity service accepts and how it merges. Loaded from the `identity`
/// section of `--config` (JSON); every field has a documented default.
public struct IdentityRules: Sendable, Codable, Hashable {
    /// Identifier types besides the built-in `email`, `phone`, `customer_id`,
    /// `device_id`, `cookie_id`. Values of custom types are trimmed, like ids.
    public var customTypes: [String] = []
    /// Most identifiers of a type one person may have; a merge that would exceed
    /// it is refused. Default: at most 1 `customer_id`; 5 emails; 3 phones.
    public var limits: [String: Int] = ["customer_id": 1, "email": 5, "phone": 3]
    /// Types in decreasing trust. When a link cannot merge everything, new identifiers
    /// join the person of the highest-priority identifier. Types not listed come last.
    public var priority: [String] = ["customer_id", "email", "phone", "device_id", "cookie_id"]
    /// Values never used to link (after normalization): exact strings, or regular
    /// expressions written as `/pattern/`.
    public var blocked: [String] = ["null", "undefined", "none", "nil", "0", "-1", "n/a", "na", "unknown",
                                    "anonymous", "test@test.com", "test@example.com", "/^0+$/"]
    /// Region used for phone numbers written without a country code (ISO 3166 alpha-2).
    public var defaultRegion: String = "US"
    /// When set, identifiers are stored only as HMAC-SHA256(key, "type:value"): the
    /// store holds no raw email or phone. Path of a file holding the key.
    public var privacyKeyFile: String?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case customTypes = "custom_types", limits, priority, blocked
        case defaultRegion = "default_region", privacyKeyFile = "privacy_key_file"
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = IdentityRules()
        customTypes = try c.decodeIfPresent([String].self, forKey: .customTypes) ?? d.customTypes
        limits = try c.decodeIfPresent([String: Int].self, forKey: .limits) ?? d.limits
        priority = try c.decodeIfPresent([String].self, forKey: .priority) ?? d.priority
        blocked = try c.decodeIfPresent([String].self, forKey: .blocked) ?? d.blocked
        // Upper-cased once: every use (numbers, the start-up rewrite of stored ones) reads it so.
        defaultRegion = (try c.decodeIfPresent(String.self, forKey: .defaultRegion) ?? d.defaultRegion).uppercased()
        privacyKeyFile = try c.decodeIfPresent(String.self, forKey: .privacyKeyFile)
    }

    public static let builtInTypes = ["email", "phone", "customer_id", "device_id", "cookie_id"]

    public var allTypes: [String] { Self.builtInTypes + customTypes }

    /// Checks the rules themselves; the message names the offending setting.
    public func validate() throws {
        for type in customTypes where !Normalizer.isValidTypeName(type) {
            throw RulesError("identity.custom_types: \"\(type)\" must be lower-case letters, digits and _ (1-40 chars)")
        }
        for (type, limit) in limits {
            guard allTypes.contains(type) else { throw RulesError("identity.limits: unknown identifier type \"\(type)\"") }
            guard limit >= 1 else { throw RulesError("identity.limits.\(type): must be at least 1, got \(limit)") }
        }
        for type in priority where !allTypes.contains(type) {
            throw RulesError("identity.priority: unknown identifier type \"\(type)\"")
        }
        guard PhoneRegions.callingCode[defaultRegion.uppercased()] != nil else {
            throw RulesError("identity.default_region: unknown region \"\(defaultRegion)\" (known: \(PhoneRegions.callingCode.keys.sorted().joined(separator: ", ")))")
        }
        for pattern in blocked where pattern.count > 2 && pattern.hasPrefix("/") && pattern.hasSuffix("/") {
            do { _ = try NSRegularExpression(pattern: String(pattern.dropFirst().dropLast())) } catch {
                throw RulesError("identity.blocked: \"\(pattern)\" is not a valid regular expression")
            }
        }
    }
}

public struct RulesError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Country calling codes for the regions a default region may name.
enum PhoneRegions {
    static let callingCode: [String: String] = [
        "US": "1", "CA": "1", "GB": "44", "IE": "353", "NL": "31", "BE": "32", "LU": "352", "DE": "49", "AT": "43",
        "CH": "41", "FR": "33", "ES": "34", "PT": "351", "IT": "39", "DK": "45", "SE": "46", "NO": "47", "FI": "358",
        "PL": "48", "CZ": "420", "AU": "61", "NZ": "64", "JP": "81", "IN": "91", "BR": "55", "MX": "52", "ZA": "27",
        "SG": "65",
    ]
    /// Regions whose national numbers start with a trunk prefix 0 that E.164 drops.
    static let trunkZero: Set<String> = [
        "GB", "IE", "NL", "BE", "DE", "AT", "CH", "FR", "SE", "FI", "AU", "NZ", "JP", "IN", "ZA",
    ]
    /// International prefixes other than 00, dialled before a country code (no national
    /// number of the region starts with them).
    static let exitPrefix: [String: String] = ["US": "011", "CA": "011", "AU": "0011", "JP": "010"]
    /// The calling codes of those regions (none is a prefix of another's code followed by 0).
    static let trunkZeroCodes: [String] = trunkZero.compactMap { callingCode[$0] }.sorted()
}
