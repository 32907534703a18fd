import Contracts

/// A reference to the person with canonical id `id`.
public func personRef(_ id: String) -> CommonV1.PersonRef {
    var ref = CommonV1.PersonRef()
    ref.ref = .personId(id)
    return ref
}

/// An identifier of `type` (email, phone, device_id, cookie_id, customer_id, …).
public func identifier(_ type: String, _ value: String) -> CommonV1.Identifier {
    var identifier = CommonV1.Identifier()
    identifier.type = type
    identifier.value = value
    return identifier
}

/// A reference to the person these identifiers resolve to.
public func personRef(_ identifiers: CommonV1.Identifier...) -> CommonV1.PersonRef {
    var list = CommonV1.IdentifierList()
    list.identifiers = identifiers
    var ref = CommonV1.PersonRef()
    ref.ref = .identifiers(list)
    return ref
}
