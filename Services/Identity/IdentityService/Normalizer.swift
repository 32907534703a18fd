import Crypto
import Foundation

/// A normalized identifier: the form stored and compared.
public struct NormalizedIdentifier: Hashable, Sendable, Comparable {
    public var type: String
    public var value: String

    public static func < (a: Self, b: Self) -> Bool { (a.type, a.value) < (b.type, b.value) }
}

/// Why an identifier was refused.
public enum IdentifierProblem: Error, Hashable, Sendable {
    case unknownType(String)
    case invalid(type: String, value: String, reason: String)
    case blocked(type: String, value: String)
}

/// Normalizes and validates identifiers per type, applies the blocklist and,
/// in privacy mode, turns values into keyed hashes.
public struct Normalizer: Sendable {
    public let rules: IdentityRules
    private let blockedExact: Set<String>
    private let blockedPatterns: CompiledPatterns
    private let privacyKey: [UInt8]?

    public init(rules: IdentityRules, privacyKey: [UInt8]? = nil) {
        self.rules = rules
        var exact: Set<String> = []
        var patterns: [String] = []
        for entry in rules.blocked {
            if entry.count > 2 && entry.hasPrefix("/") && entry.hasSuffix("/") {
                // Matched in NFC on both sides (see `isBlocked`), however the rule was typed.
                patterns.append(String(entry.dropFirst().dropLast()).precomposedStringWithCanonicalMapping)
            } else {
                exact.insert(entry.lowercased())
            }
        }
        blockedExact = exact
        blockedPatterns = CompiledPatterns(patterns.compactMap { try? NSRegularExpression(pattern: $0) })
        self.privacyKey = privacyKey
    }

    public var isPrivate: Bool { privacyKey != nil }

    /// Emails are composed to Unicode NFC; false only for a privacy-mode store that hashed
    /// emails as typed before (`IdentityStore`, migration v10).
    public var composesEmails = true

    /// What is trimmed from a value's ends: white space, and the invisible format characters
    /// that copies from spreadsheets and web forms carry (a byte-order mark, zero-width
    /// spaces and joiners): `"\u{FEFF}ada@example.com"` is Ada's address.
    static let blank = CharacterSet.whitespacesAndNewlines.union(CharacterSet(charactersIn: "\u{FEFF}\u{200B}\u{200C}\u{200D}\u{2060}"))

    static func isValidTypeName(_ type: String) -> Bool {
        (1...40).contains(type.count) && type.allSatisfy { $0.isASCII && ($0.isLowercase || $0.isNumber || $0 == "_") }
    }

    /// The normalized, validated form of `value` as a `type`, or why it is refused.
    public func normalize(type rawType: String, value raw: String) -> Result<NormalizedIdentifier, IdentifierProblem> {
        let type = rawType.trimmingCharacters(in: .whitespaces).lowercased()
        guard rules.allTypes.contains(type) else { return .failure(.unknownType(rawType)) }
        let sent = raw.trimmingCharacters(in: Self.blank)
        // A placeholder ("null", "n/a", "0") that is not a valid value of its type is blocked
        // as sent: in an email or phone field it is no address or number, and it must not
        // fail the request the other identifiers came in. (A valid value is blocked in its
        // normalized form, below, which Erase and lookups use.)
        func invalid(_ reason: String) -> Result<NormalizedIdentifier, IdentifierProblem> {
            blockedExact.contains(sent.lowercased()) ? .failure(.blocked(type: type, value: sent)) : .failure(.invalid(type: type, value: raw, reason: reason))
        }
        let value: String
        switch type {
        case "email":
            // Composed (NFC): an address typed with a combining accent is the same address.
            let lowered = sent.lowercased()
            value = composesEmails ? lowered.precomposedStringWithCanonicalMapping : lowered
            if let reason = Self.emailProblem(value) { return invalid(reason) }
        case "phone":
            switch Self.e164(raw, region: rules.defaultRegion.uppercased()) {
            case .success(let number): value = number
            case .failure(let reason): return invalid(reason.description)
            }
        default:
            value = sent
            guard !value.isEmpty else { return invalid("is empty") }
            // Bytes (a character may be many); 1,024 keeps every value stored under the
            // earlier limit of 256 characters reachable.
            guard value.utf8.count <= 1024 else { return invalid("is longer than 1024 bytes") }
        }
        if isBlocked(value) { return .failure(.blocked(type: type, value: value)) }
        return .success(NormalizedIdentifier(type: type, value: value))
    }

    /// Exact entries compare as Swift strings (canonically equivalent forms are equal);
    /// patterns match the value's NFC form, since a regular expression compares code units.
    func isBlocked(_ value: String) -> Bool {
        if blockedExact.contains(value.lowercased()) { return true }
        guard !blockedPatterns.expressions.isEmpty else { return false }
        let composed = value.precomposedStringWithCanonicalMapping
        let range = NSRange(composed.startIndex..., in: composed)
        return blockedPatterns.expressions.contains { $0.firstMatch(in: composed, range: range) != nil }
    }

    /// Which key the stored values are made with, without revealing it: "none", or
    /// "hmac-sha256:" and the first 8 bytes (hex) of the key's HMAC of a fixed text.
    public var keyFingerprint: String {
        guard let privacyKey else { return "none" }
        let mac = HMAC<SHA256>.authenticationCode(for: Data("arbiter-identity privacy key check".utf8), using: SymmetricKey(data: privacyKey))
        return "hmac-sha256:" + mac.prefix(8).map { String(format: "%02x", $0) }.joined()
    }

    /// What is stored for an identifier: the value itself, or in privacy mode `h:` and
    /// the hex HMAC-SHA256 of `type:value`.
    public func storedValue(_ id: NormalizedIdentifier) -> String {
        guard let privacyKey else { return id.value }
        let mac = HMAC<SHA256>.authenticationCode(for: Data("\(id.type):\(id.value)".utf8), using: SymmetricKey(data: privacyKey))
        return "h:" + mac.map { String(format: "%02x", $0) }.joined()
    }

    /// Regular expressions compiled once (compiling per lookup cost more than the lookup).
    /// NSRegularExpression is immutable and safe to share between threads.
    struct CompiledPatterns: @unchecked Sendable {
        let expressions: [NSRegularExpression]
        init(_ expressions: [NSRegularExpression]) { self.expressions = expressions }
    }

    static func emailProblem(_ email: String) -> String? {
        // 254 characters (as before), and 1,024 bytes at most.
        guard email.count <= 254, email.utf8.count <= 1024 else { return "is longer than 254 characters" }
        let parts = email.split(separator: "@", omittingEmptySubsequences: false)
        guard parts.count == 2, !parts[0].isEmpty, !parts[1].isEmpty else { return "is not an email address (local@domain)" }
        guard !email.contains(where: { $0.isWhitespace }) else { return "contains whitespace" }
        guard !email.unicodeScalars.contains(where: { $0.properties.generalCategory == .format }) else {
            return "contains an invisible format character (such as U+200B)"
        }
        let domain = parts[1]
        guard domain.contains("."), !domain.hasPrefix("."), !domain.hasSuffix("."), !domain.contains("..") else {
            return "has no valid domain"
        }
        return nil
    }

    /// E.164: `+` and 8 to 15 digits. Accepts `+31 6 1234 5678`, `0031…` (or the default
    /// region's own international prefix: `011 31…` in the US and Canada, `0011 31…` in
    /// Australia, `010 31…` in Japan), and national numbers (`06 1234 5678`) in the default
    /// region. The trunk prefix 0, dialled only at
    /// home, is dropped however it is written: `+44 (0)20…`, `+31 06…` (not for regions that
    /// keep the 0 in the international number, such as Italy: `+39 06…`).
    static func e164(_ raw: String, region: String) -> Result<String, RulesError> {
        var text = raw.trimmingCharacters(in: Self.blank)
        guard !text.isEmpty else { return .failure(RulesError("is empty")) }
        let allowed = Set("0123456789+-. ()/")
        guard text.allSatisfy({ allowed.contains($0) }) else { return .failure(RulesError("contains characters that are not part of a phone number")) }
        var international = text.hasPrefix("+")
        if !international, let exit = [PhoneRegions.exitPrefix[region], "00"].compactMap({ $0 }).first(where: { text.hasPrefix($0) }) {
            text.removeFirst(exit.count)
            international = true
        }
        // "(0)" marks the trunk 0: dropped below where E.164 drops it, kept where it is part of
        // the number (+39 (0)6… is +39 06…).
        text = text.replacingOccurrences(of: "(0)", with: "0")
        var digits = text.filter(\.isNumber)
        if international, let code = PhoneRegions.trunkZeroCodes.first(where: { digits.hasPrefix($0 + "0") }) {
            digits.remove(at: digits.index(digits.startIndex, offsetBy: code.count))
        }
        if !international {
            guard let code = PhoneRegions.callingCode[region] else { return .failure(RulesError("no default region")) }
            if PhoneRegions.trunkZero.contains(region), digits.hasPrefix("0") { digits.removeFirst() }
            if region == "US" || region == "CA", digits.count == 11, digits.hasPrefix("1") { digits.removeFirst() }
            digits = code + digits
        }
        guard (8...15).contains(digits.count), !digits.hasPrefix("0") else {
            return .failure(RulesError("is not a valid phone number (E.164 allows 8 to 15 digits with a country code)"))
        }
        return .success("+" + digits)
    }
}
