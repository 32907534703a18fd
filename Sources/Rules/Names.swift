public import RPC
import Contracts

/// The names clients give to what rules and requests refer to (features, segments, traits,
/// event types, properties, actions, placements, consent purposes, context keys), and the
/// person ids they send. One definition, so every service accepts and rejects the same.
public enum Names {
    public static let maxLength = 64

    /// A name: 1–64 characters of letters, digits, `_`, `-`, `.` and `:`.
    public static func check(_ name: String, field: String) throws(RPCError) {
        guard !name.isEmpty else { throw .invalidArgument(field: field, "is required") }
        guard name.utf8.count <= maxLength else { throw .invalidArgument(field: field, "is longer than \(maxLength) bytes") }
        guard name.unicodeScalars.allSatisfy({
            switch $0 {
            case "a"..."z", "A"..."Z", "0"..."9", "_", "-", ".", ":": return true
            default: return false
            }
        }) else {
            throw .invalidArgument(field: field, "\"\(name)\" may hold only letters, digits, _, -, . and :")
        }
    }

    /// A consent purpose: a name that does not end in a channel's name (`.email`, `.sms`,
    /// `.push`, `.in_app`, `.webhook`), since rules read `consent.marketing.email` as purpose
    /// `marketing` on email. Checked where purposes are written (SetConsent, UpsertAction,
    /// Route), not where they are read back.
    public static func checkPurpose(_ purpose: String, field: String) throws(RPCError) {
        try check(purpose, field: field)
        guard let dot = purpose.lastIndex(of: "."),
              let channel = CommonV1.Channel.delivery.first(where: { $0.ruleName == purpose[purpose.index(after: dot)...] }) else { return }
        throw .invalidArgument(field: field, "\"\(purpose)\" ends in a channel name: rules would read consent.\(purpose) as purpose "
                               + "\"\(purpose[..<dot])\" on \(channel.ruleName); name the purpose alone and give the channel")
    }

    /// A person id as the identity service mints them: 1–64 printable ASCII characters without spaces.
    public static func personID(_ id: String, field: String) throws(RPCError) -> String {
        guard !id.isEmpty else { throw .invalidArgument(field: field, "is required") }
        guard id.utf8.count <= maxLength else { throw .invalidArgument(field: field, "is longer than \(maxLength) bytes") }
        guard isPrintableWithoutSpaces(id) else {
            throw .invalidArgument(field: field, "may hold only printable ASCII without spaces")
        }
        return id
    }

    /// Only printable ASCII, no space (person ids, idempotency keys).
    private static func isPrintableWithoutSpaces(_ text: String) -> Bool {
        text.unicodeScalars.allSatisfy { $0.isASCII && $0.value > 32 && $0.value < 127 }
    }

    /// The longest idempotency key (Route's `idempotency_key`, Decide's `request_id`).
    public static let maxKeyLength = 128

    /// An idempotency key: 1–128 printable ASCII characters without spaces.
    public static func checkKey(_ key: String, field: String) throws(RPCError) {
        guard !key.isEmpty else { throw .invalidArgument(field: field, "is required") }
        guard key.utf8.count <= maxKeyLength, isPrintableWithoutSpaces(key) else {
            throw .invalidArgument(field: field, "must be 1–\(maxKeyLength) printable ASCII characters without spaces")
        }
    }
}
