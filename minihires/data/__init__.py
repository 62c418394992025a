"""The data: EntityGrid-QA, a generated benchmark, and the batches the trainer eats.

    entities    the entity classes, colours and places, and how an entity is drawn
    entitygrid  the generator: seeded samples, questions, answers, scoring, export
    batches     a seeded training stream, conversations packed per image, Batch building
"""
