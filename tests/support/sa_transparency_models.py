"""Models for the transparency tests: parents whose children hang off a ``write_only``, a
``dynamic`` or an association-proxied relationship, tracked at import. On their own metadata
(``TBase``): the tests create the tables in the test's database next to ``sa_models``'s.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.ext.associationproxy import AssociationProxy, association_proxy
from sqlalchemy.orm import (
    DeclarativeBase,
    DynamicMapped,
    Mapped,
    WriteOnlyMapped,
    mapped_column,
    relationship,
)

from hybridinval.sqlalchemy import track


class TBase(DeclarativeBase):
    pass


class Owner(TBase):
    __tablename__ = "hi_t_owners"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(100))
    pets: WriteOnlyMapped[Pet] = relationship(back_populates="owner", lazy="write_only")
    toys: DynamicMapped[Toy] = relationship(back_populates="owner", lazy="dynamic")
    nick_rows: Mapped[list[Nick]] = relationship(back_populates="owner")
    nicks: AssociationProxy[list[str]] = association_proxy(
        "nick_rows", "nick", creator=lambda nick: Nick(nick=nick)
    )


class Pet(TBase):
    __tablename__ = "hi_t_pets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("hi_t_owners.id"))
    owner: Mapped[Owner] = relationship(back_populates="pets")


class Toy(TBase):
    __tablename__ = "hi_t_toys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("hi_t_owners.id"))
    owner: Mapped[Owner] = relationship(back_populates="toys")


class Nick(TBase):
    __tablename__ = "hi_t_nicks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("hi_t_owners.id"))
    nick: Mapped[str] = mapped_column(String(50))
    owner: Mapped[Owner] = relationship(back_populates="nick_rows")


track(Owner, keys=["owner:{id}", "owner_by_email:{email}"])
track(Pet, keys=["pet:{id}", "owner_pets:{owner_id}"])
track(Toy, keys=["toy:{id}", "owner_toys:{owner_id}"])
track(Nick, keys=["nick:{id}", "owner_nicks:{owner_id}"])
