import Contracts

/// A reference to the person with canonical id `id`.
public func personRef(_ id: String) -> CommonV1.PersonRef {
    var ref = CommonV1.PersonRef()
    ref.ref = .personId(id)
    return ref
}
