import ArgumentParser
import Foundation

/// The `--config` JSON file: `{"identity": {...}, "profile": {...}, ...}`.
enum ConfigFile {
    /// The file's sections: one per service. `arbiter up` gives every service the same file.
    static let sections: Set<String> = ["identity", "profile", "decision", "routing"]

    /// The section decoded as `T`, nil when the file has no such section. A top-level key
    /// that is not one of `sections` (`"identiy"`, `"Identity"`: every service would start
    /// with its defaults, the identity service without its privacy key), a section that is
    /// not an object, a value of the wrong type, and a key `T` does not know (a typo, or
    /// camelCase for snake_case) stop the service with a message naming them.
    static func decode<T: Codable>(_ section: String, from data: [UInt8], as type: T.Type,
                                   sections: Set<String> = ConfigFile.sections) throws -> T? {
        let object: Any
        do {
            object = try JSONSerialization.jsonObject(with: Data(data))
        } catch {
            throw ValidationError("--config: not valid JSON: \(error.localizedDescription)")
        }
        guard let root = object as? [String: Any] else { throw ValidationError("--config: the top level must be an object") }
        if let unknown = root.keys.sorted().first(where: { !sections.contains($0) }) {
            throw ValidationError("--config: \(unknown): unknown section (the sections are \(sections.sorted().joined(separator: ", ")))")
        }
        guard let value = root[section] else { return nil }
        guard let part = value as? [String: Any] else { throw ValidationError("--config: \(section): must be an object") }
        do {
            let decoded = try JSONDecoder().decode(T.self, from: JSONSerialization.data(withJSONObject: part))
            // What `T` knows is what it writes back: a key it dropped is one it does not know.
            let known = try JSONSerialization.jsonObject(with: JSONEncoder().encode(decoded)) as? [String: Any] ?? [:]
            if let unknown = unknownKeys(part, known: known, path: section).first {
                throw ValidationError("--config: \(unknown): unknown key")
            }
            return decoded
        } catch let error as ValidationError {
            throw error
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.valueNotFound(_, context) {
            let path = ([section] + context.codingPath.map(\.stringValue)).joined(separator: ".")
            throw ValidationError("--config: \(path): \(context.debugDescription)")
        } catch {
            throw ValidationError("--config: \(section): \(error)")
        }
    }

    /// The paths of `input`'s keys that `known` lacks, at any depth, sorted (a null value
    /// stands for a key left out).
    static func unknownKeys(_ input: [String: Any], known: [String: Any], path: String) -> [String] {
        var unknown: [String] = []
        for (key, value) in input where !(value is NSNull) {
            guard let kept = known[key] else {
                unknown.append("\(path).\(key)")
                continue
            }
            if let inner = value as? [String: Any], let keptInner = kept as? [String: Any] {
                unknown += unknownKeys(inner, known: keptInner, path: "\(path).\(key)")
            }
        }
        return unknown.sorted()
    }
}
